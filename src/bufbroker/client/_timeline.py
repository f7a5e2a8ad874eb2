"""Timelines and fences on the client side, written once: pages, statuses, the blocking wait.

Signal and wait need no broker message. A process maps each timeline's page (read-write for
the signaller, read-only for everyone else) and keeps its eventfd. Signal: store the value in
the page, then write the eventfd. Wait: register the eventfd edge-triggered in an epoll
instance of one's own (once), read the page, and if the point is not reached, wait on the
epoll and read again. Each eventfd write wakes every epoll it is registered in, so waiters
never read the eventfd and the signaller's cost does not depend on how many wait; a wake-up
for another timeline, or for an older signal, only costs a second look at the page.

The blocking wait uses one epoll per thread (one epoll_wait consumes an edge, so two threads
must not share one); the trio wait (``_trio_timeline``) one per process.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import threading
import time
import weakref
from collections.abc import Sequence

from .. import protocol as p
from ..protocol import BrokerError
from ..protocol import timeline as page

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "FenceBase",
    "Point",
    "TimelineBase",
    "View",
    "Views",
    "blocking_wait",
    "combined",
    "raise_for",
    "timed_out",
]


class Epoll:
    """An epoll instance that remembers which timelines it watches (weakly referenced by them)."""

    __slots__ = ("__weakref__", "epoll", "fds")

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.fds: set[int] = set()

    def watch(self, view: View) -> None:
        if view.eventfd not in self.fds:
            self.epoll.register(view.eventfd, select.EPOLLIN | select.EPOLLET)
            self.fds.add(view.eventfd)
            view.epolls.add(self)

    def forget(self, eventfd: int) -> None:
        if eventfd in self.fds:
            self.fds.discard(eventfd)
            with contextlib.suppress(OSError):
                self.epoll.unregister(eventfd)


class View:
    """This process's mapping of one timeline's page, and its eventfd."""

    def __init__(self, desc: dict[str, Any], mem: int, eventfd: int) -> None:
        self.id: int = desc["id"]
        self.name: str | None = desc["name"]
        self.writable: bool = desc["signaller"]
        self.eventfd = eventfd
        self.epolls: weakref.WeakSet[Epoll] = weakref.WeakSet()
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self._map = mmap.mmap(mem, page.PAGE_BYTES, prot=prot)
        finally:
            os.close(mem)
        self.slots = memoryview(self._map).cast("Q")
        self.refs = 0

    def status(self, point: int) -> int:
        return page.point_status(self.slots, point)

    def close(self) -> None:
        for epoll in list(self.epolls):
            epoll.forget(self.eventfd)
        self.slots.release()
        self._map.close()
        os.close(self.eventfd)


class Views:
    """The timelines whose pages this device has mapped, shared by its timelines and fences."""

    def __init__(self) -> None:
        self.by_id: dict[int, View] = {}

    def have(self) -> tuple[int, ...]:
        return tuple(self.by_id)

    def take(self, desc: dict[str, Any], fds: Sequence[int]) -> View:
        """The view of timeline ``desc``; ``fds`` (its page and eventfd) are used or closed."""
        view = self.by_id.get(desc["id"])
        if view is None:
            view = self.by_id[desc["id"]] = View(desc, fds[0], fds[1])
        else:
            p.close_all(fds)
        view.refs += 1
        return view

    def hold(self, id: int) -> View:
        view = self.by_id[id]
        view.refs += 1
        return view

    def drop(self, view: View) -> None:
        view.refs -= 1
        if not view.refs:
            del self.by_id[view.id]
            view.close()

    def close(self) -> None:
        for view in self.by_id.values():
            view.close()
        self.by_id.clear()


Point = tuple[View, int]


def combined(points: Sequence[Point]) -> int:
    """A fence's status: the first failed point's ``-errno``, else 1 once all are reached, else 0."""
    if len(points) == 1:
        view, point = points[0]
        return page.point_status(view.slots, point)
    pending = False
    for view, point in points:
        status = view.status(point)
        if status < 0:
            return status
        pending |= status == 0
    return 0 if pending else 1


def describe(points: Sequence[Point]) -> str:
    """What a wait was for, in its error message (made only when one is raised)."""
    if len(points) == 1:
        view, point = points[0]
        return f"point {point} of timeline {view.id}"
    return "the fence"


def raise_for(status: int, points: Sequence[Point]) -> None:
    if status < 0:
        raise BrokerError(-status, f"{describe(points)} failed")


def timed_out(points: Sequence[Point], timeout: float | None) -> BrokerError:
    return BrokerError(errno.ETIME, f"{describe(points)} was not signalled within {timeout} s")


class _Local(threading.local):
    epoll: Epoll | None = None


_local = _Local()


def _forget_epolls() -> None:
    global _local
    _local = _Local()  # a forked child shares its parent's epoll instances: it needs its own


os.register_at_fork(after_in_child=_forget_epolls)


def thread_epoll() -> Epoll:
    """This thread's epoll for blocking waits (a stream's loans and receives use it too)."""
    epoll = _local.epoll
    if epoll is None:
        epoll = _local.epoll = Epoll()
    return epoll


def blocking_wait(points: Sequence[Point], timeout: float | None) -> None:
    """Wait until every point is reached (or one fails: its errno); ETIME after ``timeout`` s."""
    status = combined(points)
    if status:
        raise_for(status, points)
        return
    epoll = _local.epoll
    if epoll is None:
        epoll = _local.epoll = Epoll()
    for view, _ in points:
        epoll.watch(view)  # before the next look at the page: a later signal cannot be missed
    poll = epoll.epoll.poll
    if timeout is None:
        while not (status := combined(points)):
            poll(-1, 64)
        raise_for(status, points)
        return
    deadline = time.monotonic() + timeout
    while not (status := combined(points)):
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out(points, timeout)
        poll(left, 64)
    raise_for(status, points)


class TimelineBase:
    """A timeline this device holds: ``value``, ``error``, and signal when it is the signaller."""

    def __init__(self, views: Views, desc: dict[str, Any], fds: Sequence[int]) -> None:
        self._views = views
        self._view = views.take(desc, fds)
        self.id = self._view.id
        self.name = self._view.name
        self.closed = False

    @property
    def signaller(self) -> bool:
        return self._view.writable

    @property
    def value(self) -> int:
        return page.value(self._view.slots)

    @property
    def error(self) -> int:
        """The errno that failed the timeline from ``error_point`` on; 0 if none."""
        return page.error(self._view.slots)

    @property
    def promised(self) -> int:
        return page.promised(self._view.slots)

    def signal(self, point: int, *, error: int = 0) -> None:
        """Advance to ``point`` (above the value: EINVAL), failing it with ``error`` if given.

        Only the signaller may (EPERM). No broker message: a store and an eventfd write.
        """
        view = self._view
        if not view.writable:
            raise BrokerError(errno.EPERM, f"only the signaller of timeline {view.id} may signal it")
        page.signal(view.slots, point, error, time.monotonic_ns())
        page.kick(view.eventfd)

    def status(self, point: int) -> int:
        """1 reached, 0 pending, ``-errno`` failed."""
        return self._view.status(point)

    def _points(self, point: int) -> tuple[Point]:
        return ((self._view, point),)

    def _close_local(self) -> None:
        if not self.closed:
            self.closed = True
            self._views.drop(self._view)

    def __repr__(self) -> str:
        role = "signaller" if self.signaller else "waiter"
        return f"<Timeline {self.id} {self.name!r} value {self.value} ({role})>"


class FenceBase:
    """A sync_file: a descriptor that turns readable, for good, once all its points are reached."""

    def __init__(self, views: Views, fd: int, result: dict[str, Any], fds: Sequence[int]) -> None:
        self._views = views
        self._fd = fd
        descs = {d["id"]: d for d in result["timelines"]}
        fresh = list(fds)
        self._points: list[Point] = []
        try:
            for id, point in result["points"]:
                if id in descs:
                    view = views.take(descs[id], fresh[:2])
                    del fresh[:2]
                else:
                    view = views.hold(id)
                self._points.append((view, point))
        except BaseException:
            p.close_all(fresh)
            self.close_local()
            raise
        self.closed = False

    def fileno(self) -> int:
        """Poll it for reading with any event loop: readable once signalled (a byte, then end-of-file)."""
        return self._fd

    @property
    def status(self) -> int:
        """1 signalled, 0 pending, ``-errno`` if a point failed (SYNC_IOC_FILE_INFO's status)."""
        return combined(self._points)

    def info(self) -> list[dict[str, Any]]:
        """Each point: its timeline, status and the time of its timeline's latest signal."""
        return [
            {
                "timeline": view.id,
                "name": view.name,
                "point": point,
                "status": view.status(point),
                "timestamp_ns": page.signalled_at(view.slots) if view.status(point) else 0,
            }
            for view, point in self._points
        ]

    def share(self) -> int:
        """A new descriptor of this fence, the caller's to send and close."""
        return os.dup(self._fd)

    def close_local(self) -> None:
        if getattr(self, "closed", False):
            return
        self.closed = True
        for view, _ in self._points:
            self._views.drop(view)
        self._points = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        points = ", ".join(f"{v.id}:{pt}" for v, pt in self._points)
        return f"<Fence [{points}] status {self.status}>"
