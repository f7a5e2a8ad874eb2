"""What one uid can make the broker hold, or break, through heaps and seals."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import bufbroker
from bufbroker import Access, Direction
from bufbroker.broker._shm import prefix_for

from conftest import Broker, RawClient, start_broker

HUGE = 2 << 20


def _code(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call(*args, **kwargs)
    return e.value.errno or 0


@pytest.mark.parametrize("heap", ["hugetlb", "shm"])
def test_a_byte_of_a_heap_is_charged_as_its_whole_backing(
    broker_factory: Callable[..., Broker], huge_pages: Callable[..., None], heap: str
) -> None:
    """One byte on hugetlb takes a 2 MiB page from a pool everyone shares: 2 MiB is charged."""
    huge_pages(8)
    b = broker_factory("--max-bytes-per-uid", "4M")
    with b.connect() as dev:
        page = HUGE if heap == "hugetlb" else 4096
        held = [dev.allocate(1, heap=heap) for _ in range((4 << 20) // page)]
        assert _code(dev.allocate, 1, heap=heap) == errno.EDQUOT
        assert dev.stats()["usage"]["bytes"] == 4 << 20
        assert [b.size for b in held][:1] == [1]


def test_a_writer_that_seals_the_memfd_itself_only_fails_the_seal(broker: Broker) -> None:
    """Until it is sealed, a sealable memfd lacks F_SEAL_SEAL: a writer may add seals first."""
    with broker.connect() as dev:
        buf = dev.allocate(4096, sealable=True)
        _result, fds = dev._call(bufbroker.protocol.CpuBegin(buffer=buf.id, access=Access.RW))
        dev._call(bufbroker.protocol.CpuEnd(buffer=buf.id, access=Access.RW))
        fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        os.close(fds[0])
        assert _code(buf.seal) == errno.EPERM
        assert buf.sealed is False
        with buf.cpu_access(Access.WRITE) as mem:  # the refused seal left it writable
            mem[:2] = b"ok"
        dev.ping()


def test_waiting_sealed_opens_are_charged_like_waiting_opens(
    broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient]
) -> None:
    b = broker_factory("--max-waiting-opens-per-uid", "2")
    with b.connect() as dev:
        buf = dev.allocate(4096, name="slow", sealable=True)
        c = raw(b)
        c.hello()
        c.request(1, "open", {"name": "slow", "timeout": 30, "sealed": True})
        c.request(2, "open", {"name": "slow", "timeout": 30, "sealed": True})
        c.request(3, "open", {"name": "slow", "timeout": 30, "sealed": True})
        reply = c.recv()
        assert reply[:2] == [2, 3] and reply[2]["errno"] == errno.EDQUOT
        b.wait_for(lambda: dev.stats()["usage"]["waiting"] == 2)
        dev.open("slow").close()  # the name is opened: its waiters look, and wait on
        c.request(4, "ping", {})
        assert c.recv()[:2] == [1, 4]
        buf.seal()
        answers = sorted((c.recv()[1], c.recv()[1]))
        assert answers == [1, 2]
        b.wait_for(lambda: dev.stats()["usage"]["waiting"] == 0)


def test_objects_another_uid_plants_under_the_prefix_are_never_adopted(
    broker_factory: Callable[..., Broker], other_uid: int
) -> None:
    """/dev/shm is writable by all: a record forged by another uid must not become a buffer."""
    first = broker_factory()
    directory = Path(first.socket).parent
    stem = prefix_for(first.socket)
    first.stop()
    forge = (
        "import os, msgpack, posix_ipc\n"
        f"os.setgid({other_uid}); os.setuid({other_uid})\n"
        f"posix_ipc.SharedMemory('{stem}7-00000000', posix_ipc.O_CREX, mode=0o644, size=4096).close_fd()\n"
        "data = msgpack.packb({'version': 1, 'id': 7, 'size': 4096, 'span': 4096, 'owner': 0, "
        "'name': 'forged', 'exporter': [1, 'x', 1], 'created': 0.0, 'layout': None})\n"
        f"m = posix_ipc.SharedMemory('{stem}7-00000000.r', posix_ipc.O_CREX, mode=0o644, size=len(data))\n"
        "os.pwrite(m.fd, data, 0)\n"
    )
    subprocess.run([sys.executable, "-c", forge], check=True)
    again = start_broker(directory)
    try:
        with again.connect() as dev:
            assert dev.buffers() == []
            assert _code(dev.open, "forged") == errno.ENOENT
            buf = dev.allocate(4096, heap="shm", name="mine")
            with buf.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
                m.memory[:2] = b"ok"
    finally:
        again.stop()
        for entry in os.listdir("/dev/shm"):
            if entry.startswith(stem.lstrip("/")):
                os.unlink(f"/dev/shm/{entry}")


def _free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    raise KeyError("HugePages_Free")


def test_committing_huge_pages_does_not_hold_up_other_clients(
    broker: Broker, huge_pages: Callable[..., None]
) -> None:
    """A 1 GiB hugetlb map takes and zeroes 512 pages before its reply: off the loop.

    While the pool is being drained (the commit is under way), another client's ping is
    answered, and the commit is still under way when the answer comes.
    """
    huge_pages(512)
    with broker.connect("big") as big, broker.connect("other") as other:
        buf = big.allocate(1 << 30, heap="hugetlb")
        att = buf.attach()
        thread = threading.Thread(target=lambda: att.map(Direction.FROM_DEVICE))
        thread.start()
        deadline = time.monotonic() + 30
        while _free_huge_pages() == 512 and time.monotonic() < deadline:
            time.sleep(0.0005)
        other.ping()
        still_committing = _free_huge_pages() > 0
        thread.join()
        assert still_committing


def test_a_map_behind_a_waiting_open_commits_huge_pages_first(
    broker: Broker, raw: Callable[[Broker], RawClient], huge_pages: Callable[..., None]
) -> None:
    """Requests that refer to a waiting open are answered after it: their memory is still
    committed before the reply (a short pool: ENOMEM, not a SIGBUS later)."""
    import msgpack

    from bufbroker.protocol import close_all, fds_from_ancillary

    huge_pages(1)
    c = raw(broker)
    c.hello()
    c.request(1, "open", {"name": "later", "timeout": 30})
    c.request(2, "attach", {"buffer": {"ref": 1}})
    c.request(3, "map", {"attachment": {"ref": 2}, "direction": "bidirectional"})
    c.request(4, "seal", {"buffer": {"ref": 1}})
    with broker.connect() as dev:
        dev.allocate(3 * HUGE, name="later", heap="hugetlb", sealable=True)
        replies = []
        for _ in range(4):
            data, ancdata, flags, _ = c.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64))
            close_all(fds_from_ancillary(ancdata, flags, 16))
            replies.append(msgpack.unpackb(data))
        assert [r[:2] for r in replies] == [[1, 1], [1, 2], [2, 3], [1, 4]]
        assert replies[2][2]["errno"] == errno.ENOMEM  # 3 pages wanted, 1 in the pool
        assert replies[3][2] == {"sealed": True, "immutable": False}


def test_a_cpu_access_that_waited_for_fences_commits_huge_pages_first(
    broker: Broker, huge_pages: Callable[..., None]
) -> None:
    """A cpu access parked behind its buffer's fences is answered later: with its huge pages
    taken before the reply all the same (or ENOMEM), never a backing a touch would SIGBUS."""
    huge_pages(1)
    with broker.connect("writer") as dev, broker.connect("reader") as reader:
        buf = dev.allocate(2 * HUGE, name="fenced", heap="hugetlb")
        tl = dev.timeline()
        buf.attach_fence(tl.fence(1), Access.WRITE)
        mine = reader.open("fenced")
        result: list[int] = []

        def begin() -> None:
            try:
                mine.cpu_access(Access.READ).begin()
            except bufbroker.BrokerError as e:
                result.append(e.errno or 0)

        thread = threading.Thread(target=begin)
        thread.start()
        time.sleep(0.2)
        assert thread.is_alive()  # parked behind the fence
        tl.signal(1)
        thread.join(10)
        assert result == [errno.ENOMEM]  # 2 huge pages wanted, 1 in the pool: said in the reply
