"""Requests that use what an earlier request made, ``{"ref": id}``, before its reply arrives."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import msgpack
import pytest

import bufbroker
from bufbroker import Constraints, Direction, Segment

from conftest import Broker, RawClient


def _replies(c: RawClient, n: int) -> list[tuple[list[object], list[int]]]:
    """The next ``n`` packets, with their descriptors (the caller closes them)."""
    from bufbroker.protocol import fds_from_ancillary

    out = []
    for _ in range(n):
        data, ancdata, flags, _ = c.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64))
        out.append((msgpack.unpackb(data), fds_from_ancillary(ancdata, flags, 16)))
    return out


def test_allocate_attach_and_map_in_one_round_trip(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    c = raw(broker)
    c.hello()
    c.request(1, "allocate", {"size": 8192})
    c.request(2, "attach", {"buffer": {"ref": 1}})
    c.request(3, "map", {"attachment": {"ref": 2}, "direction": "bidirectional"})
    c.request(4, "cpu_begin", {"buffer": {"ref": 1}, "access": "read"})
    (allocated, handle), (attached, _), (mapped, backing), (begun, more) = _replies(c, 4)
    assert [allocated[:2], attached[:2], mapped[:2], begun[:2]] == [[1, 1], [1, 2], [1, 3], [1, 4]]
    assert mapped[2]["segments"] == [[0, 0, 8192]] and len(backing) == 1 and mapped[2]["writable"]
    os.pwrite(backing[0], b"one trip", 0)
    assert os.pread(more[0], 8, 0) == b"one trip"
    for fd in [*handle, *backing, *more]:
        os.close(fd)
    # Giving it all back needs no waiting either.
    c.request(5, "cpu_end", {"buffer": 1, "access": "read"})
    c.request(6, "unmap", {"attachment": 1})
    c.request(7, "detach", {"attachment": 1})
    c.request(8, "release", {"buffer": 1})
    assert [r[0][:2] for r in _replies(c, 4)] == [[1, 5], [1, 6], [1, 7], [1, 8]]


def test_a_reference_to_a_failed_request_is_ecanceled(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    c = raw(broker)
    c.hello()
    r, w = os.pipe()
    c.request(1, "import", {}, (r,))  # not a handle: EINVAL
    os.close(r)
    os.close(w)
    c.request(2, "attach", {"buffer": {"ref": 1}})
    c.request(3, "map", {"attachment": {"ref": 2}, "direction": "to_device"})
    c.request(4, "attach", {"buffer": {"ref": 99}})  # no such request
    c.request(5, "ping", {})
    c.request(6, "attach", {"buffer": {"ref": 5}})  # a ping makes nothing
    c.request(7, "attach", {"buffer": {"ref": 1, "extra": 2}})
    codes = [r[0][2]["errno"] if r[0][0] == 2 else 0 for r in _replies(c, 7)]
    canceled, invalid = errno.ECANCELED, errno.EINVAL
    assert codes == [invalid, canceled, canceled, invalid, 0, invalid, invalid]


def test_requests_that_refer_to_a_waiting_open_are_answered_after_it(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    c = raw(broker)
    c.hello()
    c.request(1, "open", {"name": "later", "timeout": 30})
    c.request(2, "attach", {"buffer": {"ref": 1}})
    c.request(3, "map", {"attachment": {"ref": 2}, "direction": "to_device"})
    c.request(4, "ping", {})
    [(pong, _)] = _replies(c, 1)
    assert pong[:2] == [1, 4]  # answered at once; the chain waits for the name
    with broker.connect("maker") as maker:
        buf = maker.allocate(4096, name="later")
        replies = _replies(c, 3)
        assert [r[0][:2] for r in replies] == [[1, 1], [1, 2], [1, 3]]
        assert replies[0][0][2]["id"] == buf.id and not replies[2][0][2]["writable"]
        for _, fds in replies:
            for fd in fds:
                os.close(fd)


def test_the_client_maps_a_received_handle_in_one_round_trip(broker: Broker) -> None:
    with broker.connect("producer") as producer, broker.connect("consumer") as consumer:
        buf = producer.allocate(1 << 20, map=Direction.BIDIRECTIONAL)
        assert buf.mapping is not None and buf.mapping.segments == [Segment(0, 1 << 20)]
        buf.mapping.memory[:5] = b"hello"
        handle = buf.share(readonly=True)
        theirs = consumer.import_handle(handle, map=Direction.TO_DEVICE)
        os.close(handle)
        assert theirs.mapping is not None and bytes(theirs.mapping.memory[:5]) == b"hello"
        assert theirs.mapping.memory.readonly
        [entry] = [b for b in producer.buffers() if b["id"] == buf.id]
        assert sorted(a["map_count"] for a in entry["attachments"]) == [1, 1]
        theirs.close()  # unmap, detach, release: sent, not waited for
        buf.close()
        broker.wait_for(lambda: producer.buffers() == [])
        named = producer.allocate(4096, name="frame")
        opened = consumer.open("frame", map=Direction.TO_DEVICE)
        assert opened.id == named.id and opened.mapping is not None
        opened.close()
        named.close()


def test_a_chain_that_fails_part_way_gives_back_what_it_made(broker: Broker) -> None:
    """A device whose constraints no layout of the buffer meets: the import stands, the attach
    fails, the map is cancelled, and the import is given back."""
    with (
        broker.connect("producer") as producer,
        broker.connect("picky", constraints=Constraints(max_segments=1, max_segment_size=4096)) as picky,
    ):
        buf = producer.allocate(1 << 20)
        handle = buf.share()
        with pytest.raises(bufbroker.BrokerError) as e:
            picky.import_handle(handle, map=Direction.TO_DEVICE)
        assert e.value.errno == errno.EINVAL
        picky.ping()
        [entry] = producer.buffers()
        assert [(i["device"], i["count"]) for i in entry["importers"]] == [(producer.id, 1)]
        r, w = os.pipe()
        with pytest.raises(bufbroker.BrokerError) as e:
            picky.import_handle(r, map=Direction.TO_DEVICE)  # not a handle: nothing was made
        assert e.value.errno == errno.EINVAL
        picky.ping()
        for fd in (r, w, handle):
            os.close(fd)
        buf.close()


async def test_the_trio_client_maps_in_one_round_trip_and_gives_back_a_cancelled_chain(
    broker: Broker,
) -> None:
    import trio

    async with bufbroker.open_device("consumer", socket=broker.socket) as dev:
        with broker.connect("producer") as producer:
            buf = producer.allocate(8192, name="frame", map=Direction.BIDIRECTIONAL)
            assert buf.mapping is not None
            buf.mapping.memory[:3] = b"abc"
            handle = buf.share()
            theirs = await dev.import_handle(handle, map=Direction.TO_DEVICE)
            os.close(handle)
            assert theirs.mapping is not None and bytes(theirs.mapping.memory[:3]) == b"abc"
            await theirs.close()
            opened = await dev.open("frame", map=Direction.TO_DEVICE)
            assert opened.mapping is not None and opened.id == buf.id
            await opened.close()
            # A chain cancelled while its open waits for a name: given back once the name comes.
            with trio.move_on_after(0.2):
                await dev.open("later", timeout=30, map=Direction.TO_DEVICE)
            later = producer.allocate(4096, name="later")
            await dev.ping()
            await dev.ping()
            entries = {b["id"]: b for b in producer.buffers()}
            assert [i["name"] for i in entries[later.id]["importers"]] == ["producer"]
            assert entries[later.id]["attachments"] == []
            later.close()
            buf.close()
