"""Timelines and fences for the trio client: the same waits, through one epoll per process.

Every timeline eventfd a task waits on is registered edge-triggered in one epoll instance,
which trio waits on as one readable descriptor. trio lets one task at a time wait on a
descriptor, so the first waiting task polls for everyone: it takes the epoll's events and
wakes the tasks that wait on those timelines (and only those); if it leaves (done, cancelled,
timed out) while others still wait, one of them takes over. Everyone looks at the pages again
after each wake-up: the page is the truth, a wake-up only a hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from .. import protocol as p
from ._core import take_one_fd
from ._timeline import Epoll, FenceBase, Point, TimelineBase, combined, raise_for, timed_out

if TYPE_CHECKING:
    from ._trio import Device

__all__ = ["Fence", "Timeline", "wait_points"]


class _Hub:
    """This trio run's epoll, and who waits for which eventfd."""

    def __init__(self) -> None:
        self.epoll = Epoll()
        self.waiting: dict[int, set[trio.Event]] = {}  # by eventfd
        self.everyone: set[trio.Event] = set()
        self.polling = False

    def wake(self, fds: Sequence[int]) -> None:
        for fd in fds:
            for event in self.waiting.pop(fd, ()):
                event.set()

    def handover(self) -> None:
        """The polling task leaves: wake one other waiter, which polls from now on."""
        for event in self.everyone:
            if not event.is_set():
                event.set()
                return


_HUB: trio.lowlevel.RunVar[_Hub] = trio.lowlevel.RunVar("bufbroker_timeline_hub")


def _hub() -> _Hub:
    try:
        return _HUB.get()
    except LookupError:
        hub = _Hub()
        _HUB.set(hub)
        return hub


async def wait_points(points: Sequence[Point], timeout: float | None) -> None:
    """Until every point is reached (or one fails: its errno); ETIME after ``timeout`` s."""
    status = combined(points)
    if status:
        # Reached already: a cancellation point, but no yield to the scheduler (6 µs here). A
        # peer that answers within the time it takes to come back here is the common case.
        await trio.lowlevel.checkpoint_if_cancelled()
        raise_for(status, points)
        return
    hub = _hub()
    for view, _ in points:
        hub.epoll.watch(view)  # before the next look at the page: a later signal cannot be missed
    fds = [view.eventfd for view, _ in points]
    if timeout is None:
        await _until(hub, points, fds)
        return
    with trio.move_on_after(timeout):
        await _until(hub, points, fds)
        return
    raise timed_out(points, timeout)


async def _until(hub: _Hub, points: Sequence[Point], fds: list[int]) -> None:
    while True:
        status = combined(points)
        if status:
            raise_for(status, points)
            return
        await _wake_up(hub, fds)


async def _wake_up(hub: _Hub, fds: list[int]) -> None:
    """Return after some of ``fds`` may have been written (or spuriously)."""
    if not hub.polling:
        # Edges left from signals nobody was waiting for (a wait that found its point reached
        # does not take them) would wake the epoll at once: take them first, then look again.
        stale = hub.epoll.epoll.poll(0, 256)
        if stale:
            hub.wake([fd for fd, _ in stale])
            return
        hub.polling = True
        try:
            await trio.lowlevel.wait_readable(hub.epoll.epoll.fileno())
            hub.wake([fd for fd, _ in hub.epoll.epoll.poll(0, 256)])
        finally:
            hub.polling = False
            hub.handover()
        return
    event = trio.Event()
    for fd in fds:
        hub.waiting.setdefault(fd, set()).add(event)
    hub.everyone.add(event)
    try:
        await event.wait()
    finally:
        hub.everyone.discard(event)
        for fd in fds:
            waiting = hub.waiting.get(fd)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del hub.waiting[fd]


class Timeline(TimelineBase):
    """A timeline this device holds; ``await dev.timeline()`` or ``await dev.import_timeline(fd)``."""

    def __init__(self, device: Device, desc: dict[str, Any], fds: list[int]) -> None:
        super().__init__(device._views, desc, fds)
        self._device = device
        device._syncs.add(self)

    async def wait(self, point: int, *, timeout: float | None = None) -> None:
        """Until ``point`` is reached (no broker message); its error if it failed; ETIME on timeout."""
        await wait_points(self._points(point), timeout)

    async def fence(self, point: int) -> Fence:
        """A fence for ``point``: the signaller's promises it (max_fence_time starts)."""
        result, fds = await self._device._call(p.MakeFence(timeline=self.id, point=point))
        return Fence(self._device, take_one_fd(fds[:1]), result, fds[1:])

    async def share(self) -> int:
        """A new handle to this timeline, the caller's to send and close."""
        return take_one_fd((await self._device._call(p.ShareTimeline(timeline=self.id)))[1])

    async def close(self) -> None:
        """Let the timeline go (the broker frees it once nothing holds it)."""
        if not self.closed and not self._device.closed:
            await self._device._settle(p.ReleaseTimeline(timeline=self.id), self._closed)
        else:
            self._closed()

    def _closed(self) -> None:
        self._close_local()
        self._device._syncs.discard(self)

    async def __aenter__(self) -> Timeline:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class Fence(FenceBase):
    """A sync_file: ``fileno()`` turns readable, for good, once every point is reached."""

    def __init__(self, device: Device, fd: int, result: dict[str, Any], fds: list[int]) -> None:
        super().__init__(device._views, fd, result, fds)
        self._device = device
        device._syncs.add(self)

    async def wait(self, timeout: float | None = None) -> None:
        """Until every point is reached (no broker message); a point's error; ETIME on timeout."""
        await wait_points(self._points, timeout)

    async def close(self) -> None:
        self.close_local()
        self._device._syncs.discard(self)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Fence:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
