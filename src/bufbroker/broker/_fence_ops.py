"""The timeline and fence ops of one connection: the state model's calls and their descriptors.

A reply that hands over a fence describes its points and carries, after the fence itself, the
page and eventfd of each of its timelines that the caller does not list in ``have``: enough to
wait on it, or query it, with no further message. The signaller's page is read-write, everyone
else's read-only.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from .. import protocol as p
from ..protocol import BrokerError
from ._handles import handle_key
from ._records import Device, Timeline
from ._sync import Points
from ._timeline_page import TimelinePage

if TYPE_CHECKING:
    from ._connection import Connection
    from ._packets import FdBag

__all__ = ["OPS", "answer", "describe_timeline"]

OPS = (
    p.MakeTimeline,
    p.ShareTimeline,
    p.ImportTimeline,
    p.ReleaseTimeline,
    p.MakeFence,
    p.ImportFence,
    p.MergeFences,
    p.AttachFence,
    p.ExportFence,
)


def describe_timeline(timeline: Timeline, device: Device) -> dict[str, Any]:
    return {"id": timeline.id, "name": timeline.name, "signaller": timeline.live is device}


def answer(conn: Connection, args: p.OpArgs, bag: FdBag) -> tuple[Any, list[int]]:
    state, sync, dev = conn.state, conn.state.sync, conn.device
    match args:
        case p.MakeTimeline(name=name):
            page = TimelinePage.create(name or str(dev.id))
            if not state.reserve.allows(dev.uid, max(page.fd, page.eventfd)):
                page.close()
                state.reserve.check(dev.uid, [state.reserve.ceiling])
            timeline = sync.make_timeline(dev, name, page)
            return _with_page(conn, timeline, lambda: sync.release_timeline(dev, timeline.id))
        case p.ShareTimeline(timeline=id):
            timeline = sync.held(dev, id)
            state.check_handle(dev)
            fd, key = _mint(conn)
            sync.add_handle(timeline, key, dev.uid)
            return {}, [fd]
        case p.ImportTimeline():
            timeline = sync.import_timeline(dev, _key(bag.fds[0]))
            return _with_page(conn, timeline, lambda: sync.release_timeline(dev, timeline.id))
        case p.ReleaseTimeline(timeline=id):
            sync.release_timeline(dev, id)
            return {}, []
        case p.MakeFence(timeline=id, point=point):
            return _new_fence(conn, sync.fence_points(dev, id, point), (id,))
        case p.ImportFence(have=have):
            fence = sync.fence(_key(bag.fds[0]))
            return _describe_fence(conn, fence.points, have, [])
        case p.MergeFences(have=have):
            first, second = (sync.fence(_key(fd)) for fd in bag.fds[:2])
            return _new_fence(conn, sync.merge(first, second), have)
        case p.AttachFence(buffer=buffer_id, access=access):
            fence = sync.fence(_key(bag.fds[0]))
            buffer = state.share(dev, buffer_id, readonly=not access.writes)  # EACCES, EBADF
            sync.attach_fence(buffer, fence, access)
            return {}, []
        case p.ExportFence(buffer=buffer_id, access=access, have=have):
            buffer = state.share(dev, buffer_id, readonly=True)
            return _new_fence(conn, sync.reservation_points(buffer, access), have)
    raise BrokerError(errno.ENOTTY, f"{type(args).__name__} is not a timeline op")


def _key(fd: int) -> int:
    try:
        return handle_key(fd)
    except OSError:  # not a socket: no timeline handle or fence either
        raise BrokerError(errno.EINVAL, "the descriptor is not a bufbroker timeline or fence") from None


def _mint(conn: Connection, *, fence: bool = False) -> tuple[int, int]:
    """A new handle (or fence): its client end and key; EMFILE past the descriptors kept for root."""
    dev, handles, reserve = conn.device, conn.server.handles, conn.state.reserve
    try:
        ours, theirs, key = handles.mint(dev.uid, fence=fence)
    except OSError as e:
        raise BrokerError(e.errno or errno.EMFILE, f"cannot mint a handle: {e.strerror}") from None
    if not reserve.allows(dev.uid, ours):
        os.close(theirs)
        handles.discard(key)
        reserve.check(dev.uid, [ours])
    return theirs, key


def _with_page(conn: Connection, timeline: Timeline, undo: Any) -> tuple[Any, list[int]]:
    try:
        fds = timeline.page.descriptors(timeline.live is conn.device)
    except OSError as e:
        undo()
        raise BrokerError(e.errno or errno.EMFILE, f"cannot hand out the timeline: {e.strerror}") from None
    return describe_timeline(timeline, conn.device), fds


def _new_fence(conn: Connection, points: Points, have: tuple[int, ...]) -> tuple[Any, list[int]]:
    sync = conn.state.sync
    sync.check_fence_quota(conn.device.uid)
    fd, key = _mint(conn, fence=True)
    sync.add_fence(conn.device.uid, key, points)
    return _describe_fence(conn, points, have, [fd])


def _describe_fence(
    conn: Connection, points: Points, have: tuple[int, ...], fds: list[int]
) -> tuple[Any, list[int]]:
    """The points, and the pages the caller lacks; ``fds`` (the fence, if new) goes first."""
    known = set(have)
    timelines = []
    try:
        for id, (timeline, _) in points.items():
            if id not in known:
                fds += timeline.page.descriptors(timeline.live is conn.device)
                timelines.append(describe_timeline(timeline, conn.device))
    except OSError as e:
        p.close_all(fds)
        raise BrokerError(e.errno or errno.EMFILE, f"cannot hand out a fence: {e.strerror}") from None
    return {"points": [[id, point] for id, (_, point) in points.items()], "timelines": timelines}, fds
