"""Heaps: memfd, hugetlb and shm allocate, map and free across processes.

``test_alloc_zeroed`` is tools/testing/selftests/dmabuf-heaps/dmabuf-heap.c's
test_alloc_zeroed: buffers written 0xff and freed must never come back to anyone dirty.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import bufbroker
from bufbroker import Access, Direction

from conftest import Broker, Peer
from peer import pattern

HUGE = 2 << 20


@pytest.fixture(params=["memfd", "hugetlb", "shm"])
def heap(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "hugetlb":
        request.getfixturevalue("huge_pages")(40)
    yield request.param


def _code(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call(*args, **kwargs)
    return e.value.errno or 0


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_alloc_zeroed(broker: Broker, heap: str) -> None:
    """32 buffers written 0xff and freed; 32 new ones read as zeros, all of them."""
    size = 1 << 20
    with broker.connect() as dev:
        dirty = [dev.allocate(size, heap=heap) for _ in range(32)]
        for buf in dirty:
            with buf.cpu_access(Access.WRITE) as mem:
                mem[:] = b"\xff" * size
            buf.close()
        broker.wait_for(lambda: dev.buffers() == [])
        for _ in range(32):
            buf = dev.allocate(size, heap=heap)
            with buf.cpu_access(Access.READ) as mem:
                assert bytes(mem) == bytes(size)
            buf.close()


def test_every_heap_hands_a_buffer_to_another_process(
    broker: Broker, heap: str, peer: Callable[..., Peer]
) -> None:
    size = 3 * 4096 + 100
    a, b = socket.socketpair()
    consumer = peer("consume", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    b.close()
    with broker.connect("producer") as dev:
        buf = dev.allocate(size, heap=heap)
        assert (buf.size, buf.heap) == (size, heap)
        with buf.cpu_access(Access.WRITE) as mem:
            assert len(mem) == size
            mem[:] = pattern(size)
        handle = buf.share()
        bufbroker.send_handle(a, handle)
        os.close(handle)
        seen = json.loads(consumer.line())
        assert seen["sha"] == hashlib.sha256(pattern(size)).hexdigest()
        consumer.finish()
        [entry] = dev.buffers()
        span = HUGE if heap == "hugetlb" else 4 * 4096
        assert (entry["heap"], entry["size"], entry["span"]) == (heap, size, span)
    a.close()


def test_a_frame_keeps_its_size(broker: Broker, heap: str) -> None:
    """1920x1080 RGB is 6,220,800 bytes, not the 6,221,824 of its pages: reshapes work."""
    with broker.connect() as dev:
        buf = dev.allocate(1920 * 1080 * 3, heap=heap)
        assert buf.size == 6_220_800
        with buf.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
            assert len(m.memory) == 6_220_800
            assert m.memory.cast("B", (1080, 1920 * 3)).shape == (1080, 5760)
            assert sum(s.length for s in m.segments) == dev.buffers()[0]["span"]


def test_heaps_lists_each_heap_and_what_it_holds(broker: Broker, huge_pages: Callable[..., None]) -> None:
    huge_pages(4)
    with broker.connect() as dev:
        dev.allocate(100, heap="hugetlb")
        listed = {h["name"]: h for h in dev.heaps()}
        assert set(listed) == {"memfd", "hugetlb", "shm"}
        assert (listed["memfd"]["page_size"], listed["hugetlb"]["page_size"]) == (4096, HUGE)
        assert all(h["available"] for h in listed.values())
        assert (listed["hugetlb"]["buffers"], listed["hugetlb"]["bytes"]) == (1, HUGE)
        assert listed["hugetlb"]["pool"]["pages"] == 4
        assert listed["shm"]["sealable"] is False and listed["memfd"]["sealable"] is True


def test_hugetlb_is_enodev_without_huge_pages(broker: Broker, huge_pages: Callable[..., None]) -> None:
    huge_pages(0)
    with broker.connect() as dev:
        assert _code(dev.allocate, 4096, heap="hugetlb") == errno.ENODEV
        [entry] = [h for h in dev.heaps() if h["name"] == "hugetlb"]
        assert entry["available"] is False and "nr_hugepages" in entry["reason"]
        dev.allocate(4096).close()  # the broker serves on


def test_a_short_huge_page_pool_is_enomem_in_the_map_reply(
    broker: Broker, huge_pages: Callable[..., None]
) -> None:
    """Never a SIGBUS at first touch: the pages are taken before the reply, or the map fails."""
    huge_pages(2)
    with broker.connect() as dev:
        buf = dev.allocate(3 * HUGE - 1, heap="hugetlb")
        with buf.attach() as att:
            assert _code(att.map, Direction.BIDIRECTIONAL) == errno.ENOMEM
            assert _code(buf.cpu_access(Access.WRITE).begin) == errno.ENOMEM
            huge_pages(3)
            with att.map(Direction.BIDIRECTIONAL) as m:
                assert _meminfo("HugePages_Free") == 0  # every page taken before the reply
                m.memory[:] = b"\x01" * len(m.memory)
                assert len(m.memory) == 3 * HUGE - 1


def test_hugetlb_memory_is_huge_pages(broker: Broker, huge_pages: Callable[..., None]) -> None:
    huge_pages(8)
    with broker.connect() as dev:
        buf = dev.allocate(4 * HUGE, heap="hugetlb")
        free = _meminfo("HugePages_Free")
        with buf.cpu_access(Access.WRITE) as mem:
            assert _meminfo("HugePages_Free") == free - 4
            mem[:] = b"\x02" * len(mem)
        buf.close()
        broker.wait_for(lambda: _meminfo("HugePages_Free") == free)


def test_one_round_trip_on_every_heap(broker: Broker, heap: str) -> None:
    """allocate(..., map=) in one round trip: on hugetlb and shm the map's memory is committed
    before its reply all the same."""
    with broker.connect() as dev, broker.connect("reader") as reader:
        sealable = heap != "shm"
        buf = dev.allocate(10_000, name="trip", heap=heap, sealable=sealable, map=Direction.BIDIRECTIONAL)
        assert buf.mapping is not None and len(buf.mapping.memory) == 10_000
        buf.mapping.memory[:4] = b"trip"
        if sealable:
            buf.mapping.unmap()
            buf.seal()
        seen = reader.open("trip", sealed=sealable, timeout=5, map=Direction.TO_DEVICE)
        assert seen.mapping is not None and bytes(seen.mapping.memory[:4]) == b"trip"
        seen.close()
