"""The stream ops of one connection: the registry's calls, the pools' memory and descriptors.

A pool is a sealed memfd like every buffer's backing (mode 0400: a subscriber's read-only
descriptor cannot be reopened for writing by another uid), whose first page the broker keeps
mapped to bump its ``members`` word. The publisher gets the pool read-write and the frame
timeline as its signaller; a subscriber gets the pool read-only, the frame timeline to wait
on and its own release timeline to signal.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import protocol as p
from ..protocol import MAX_FENCE_TIMELINES, BrokerError
from ..protocol import stream as control_page
from ._fence_ops import describe_timeline
from ._heap import Backing
from ._streams import Stream, Subscriber
from ._timeline_page import TimelinePage

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["OPS", "PoolControl", "answer", "park_subscribe"]

OPS = (p.Publish, p.Subscribe, p.StreamMembers, p.Unpublish, p.Unsubscribe)


class PoolControl:
    """The broker's mapping of a pool's control page."""

    def __init__(self, backing: Backing) -> None:
        self._map = mmap.mmap(backing.fd, control_page.PAGE_BYTES)
        self.words: control_page.Control = memoryview(self._map).cast("Q")

    def close(self) -> None:
        if not self._map.closed:
            self.words.release()
            self._map.close()


def describe(stream: Stream) -> dict[str, Any]:
    return {
        "stream": stream.id,
        "name": stream.name,
        "size": stream.size,
        "slots": stream.slots,
        "stride": control_page.stride_for(stream.size),
        "offset": control_page.PAGE_BYTES,
    }


def answer(conn: Connection, args: p.OpArgs) -> tuple[Any, list[int]]:
    streams, dev = conn.state.streams, conn.device
    match args:
        case p.Publish(name=name, size=size, slots=slots):
            return _publish(conn, name, size, slots)
        case p.Subscribe(name=name):
            stream = streams.find(dev, name)
            streams.check_subscribe(dev, stream)
            page = TimelinePage.create(name)
            _within_reserve(conn, [page.fd, page.eventfd], page.close)
            sub = streams.subscribe(dev, stream, page)
            return _subscribed(conn, sub)
        case p.StreamMembers(stream=stream_id, have=have):
            return _members(conn, streams.members(dev, stream_id), set(have))
        case p.Unpublish(stream=stream_id):
            streams.end(dev, stream_id)
            return {}, []
        case p.Unsubscribe(subscriber=sub_id):
            streams.leave(dev, sub_id)
            return {}, []
    raise BrokerError(errno.ENOTTY, f"{type(args).__name__} is not a stream op")


def _publish(conn: Connection, name: str, size: int, slots: int) -> tuple[Any, list[int]]:
    state, dev = conn.state, conn.device
    pool = state.streams.check_publish(dev, name, size, slots)
    backing = state.allocate_backing(pool, f"stream:{name}")
    try:
        control = PoolControl(backing)
        control_page.init(control.words, slots, size)
    except OSError as e:
        state.free(backing)
        raise BrokerError(e.errno or errno.ENOMEM, f"cannot map the stream's pool: {e.strerror}") from None
    try:
        page = TimelinePage.create(name)
    except BrokerError:
        control.close()
        state.free(backing)
        raise

    def undo() -> None:
        page.close()
        control.close()
        state.free(backing)

    _within_reserve(conn, [backing.fd, page.fd, page.eventfd], undo)
    stream = state.streams.publish(dev, name, size, slots, backing, control, page)
    fds: list[int] = []
    try:
        fds += backing.descriptors(True)
        fds += stream.frames.page.descriptors(True)
    except OSError as e:
        p.close_all(fds)
        state.streams.end(dev, stream.id)
        raise BrokerError(e.errno or errno.EMFILE, f"cannot hand out the stream: {e.strerror}") from None
    conn.server.stream_names.appeared((dev.uid, name))
    return {**describe(stream), "frames": describe_timeline(stream.frames, dev)}, fds


def _within_reserve(conn: Connection, kept: list[int], undo: Callable[[], None]) -> None:
    """EMFILE, undone, if what a uid other than root makes the broker keep took a descriptor
    kept for root (the kernel hands out the lowest free number: see ``_reserve``)."""
    reserve, uid = conn.state.reserve, conn.device.uid
    if not reserve.allows(uid, max(kept)):
        undo()
        reserve.check(uid, [reserve.ceiling])


def _subscribed(conn: Connection, sub: Subscriber) -> tuple[Any, list[int]]:
    stream, dev = sub.stream, conn.device
    fds: list[int] = []
    try:
        fds += stream.backing.descriptors(False)
        fds += stream.frames.page.descriptors(False)
        fds += sub.release.page.descriptors(True)
    except OSError as e:
        p.close_all(fds)
        conn.state.streams.leave(dev, sub.id)
        raise BrokerError(e.errno or errno.EMFILE, f"cannot hand out the stream: {e.strerror}") from None
    result = {
        **describe(stream),
        "subscriber": sub.id,
        "start": sub.start,
        "frames": describe_timeline(stream.frames, dev),
        "release": describe_timeline(sub.release, dev),
    }
    return result, fds


def _members(conn: Connection, subs: list[Subscriber], have: set[int]) -> tuple[Any, list[int]]:
    """Every subscriber, and the release pages the publisher lacks (a packet's worth at a time)."""
    fds: list[int] = []
    timelines: list[dict[str, Any]] = []
    try:
        for sub in subs:
            if sub.release.id not in have and len(timelines) < MAX_FENCE_TIMELINES:
                fds += sub.release.page.descriptors(False)
                timelines.append(describe_timeline(sub.release, conn.device))
    except OSError as e:
        p.close_all(fds)
        raise BrokerError(e.errno or errno.EMFILE, f"cannot hand out the members: {e.strerror}") from None
    missing = sum(1 for s in subs if s.release.id not in have) - len(timelines)
    members = [[s.id, s.start, s.release.id] for s in subs]
    return {"subscribers": members, "timelines": timelines, "more": missing > 0}, fds


def park_subscribe(conn: Connection, nursery: trio.Nursery, request: p.Request) -> None:
    """Start a ``subscribe`` that waits for its stream, charged to the uid as a waiting open."""
    assert isinstance(request.args, p.Subscribe)
    try:
        conn.state.quotas.begin_wait(conn.device.uid)
    except BrokerError as e:
        raise p.RequestError(request.id, e) from None
    conn.pending += 1
    conn.chain.unanswered(request.id)
    nursery.start_soon(_waiting_subscribe, conn, request)


async def _waiting_subscribe(conn: Connection, request: p.Request) -> None:
    """``subscribe`` that waits for the stream to be published, as ``open`` waits for a name."""
    assert isinstance(request.args, p.Subscribe)
    key = (conn.device.uid, request.args.name)
    try:
        with trio.move_on_after(request.args.timeout or 0):
            while key not in conn.state.streams.names:
                await conn.server.stream_names.wait(key)
        await conn.send_answer(request)
    finally:
        conn.pending -= 1
        conn.state.quotas.end_wait(conn.device.uid)
