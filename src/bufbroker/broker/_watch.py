"""The broker's side of timelines: watching eventfds that waits need, waking, the watchdog.

The broker is not in the path of a signal; it watches a timeline only while a fence or a parked
cpu access waits on it, through one epoll instance (registered edge-triggered, as every waiter
does) that trio waits on as one descriptor. Fences are signalled by a byte and shutting the
broker's end of their socketpair down for writing (``HandleTable.signal``): every copy turns
readable, for good.

Waking a timeline's waiters is a write to its eventfd, which any holder can make block (clear
O_NONBLOCK on the shared file, fill the counter): the broker's writes (when it fails a
timeline) run in the broker's worker threads, charged to the owning uid, on a duplicate
of the descriptor, so that a page freed meanwhile cannot hand the number to another file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import time

import trio

from ..protocol import timeline as page
from ._handles import HandleTable
from ._records import Fence, Timeline
from ._sync import Sync
from ._workers import Workers

__all__ = ["TimelineWatch"]

log = logging.getLogger("bufbroker.broker")


class TimelineWatch:
    """The hooks of ``Sync``, with I/O; ``run`` is the task that watches."""

    def __init__(self, handles: HandleTable, workers: Workers) -> None:
        self._handles = handles
        self._workers = workers
        self._epoll = select.epoll()
        self._by_fd: dict[int, Timeline] = {}
        self._sync: Sync | None = None
        self._nursery: trio.Nursery | None = None
        self._deadline_moved = trio.Event()
        self._unkicked: list[Timeline] = []  # failed before the broker served (a restore)

    def attach(self, sync: Sync) -> None:
        self._sync = sync
        sync.hooks = self

    # --- the hooks ---------------------------------------------------------------------

    def watch(self, timeline: Timeline, on: bool) -> None:
        fd = timeline.page.eventfd
        if on and fd not in self._by_fd:
            # Edge-triggered: an eventfd already readable reports once at once, so a signal
            # made between the caller's look at the page and this registration is not missed.
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
            self._by_fd[fd] = timeline
        elif not on and fd in self._by_fd:
            self._epoll.unregister(fd)
            del self._by_fd[fd]

    def kick(self, timeline: Timeline) -> None:
        if self._nursery is None:
            self._unkicked.append(timeline)  # failed at a restore: woken once serving
            return
        efd = os.dup(timeline.page.eventfd)
        self._nursery.start_soon(self._kick, efd, timeline.owner)

    async def _kick(self, efd: int, owner: int) -> None:
        def write() -> None:
            try:
                page.kick(efd)
            finally:
                os.close(efd)

        try:
            await self._workers.run(owner, write)  # the write closes its descriptor whatever happens
        except OSError as e:
            log.warning("cannot wake the waiters of a timeline: %s", e)

    def fence_done(self, fence: Fence) -> None:
        self._handles.signal(fence.key)  # every copy of the fence turns readable

    def deadline(self, when: float) -> None:
        self._deadline_moved.set()

    def freed(self, timeline: Timeline) -> None:
        self.watch(timeline, False)
        timeline.page.close()

    # --- the tasks ---------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for timeline in self._unkicked:
                if timeline.page.eventfd >= 0:
                    self.kick(timeline)
            self._unkicked.clear()
            nursery.start_soon(self._watchdog)
            await self._watch()

    async def _watch(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            try:
                self.settle()
            except Exception:  # a bug here must not stop the broker: log it, and go on
                log.exception("watching timelines failed")
                await trio.sleep(1)

    def settle(self) -> None:
        """Settle the waits of every timeline whose eventfd was written; never waits."""
        assert self._sync is not None
        for fd, _ in self._epoll.poll(0, 1024):
            timeline = self._by_fd.get(fd)
            if timeline is not None:
                self._sync.woke(timeline)

    async def _watchdog(self) -> None:
        assert self._sync is not None
        while True:
            self._deadline_moved = trio.Event()
            try:
                next = self._sync.expire()
            except Exception:
                log.exception("failing late timelines failed")
                next = time.monotonic() + 1
            delay = math.inf if next is None else max(0.0, next - time.monotonic())
            with trio.move_on_after(delay):
                await self._deadline_moved.wait()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._epoll.close()
