"""Timelines, fences and reservations: the kernel's synchronisation model, with no I/O.

Theory of operation. A timeline's page is the truth, and the broker is not in the path of a
signal or a wait: the signaller stores a value and writes the eventfd, waiters read the page.
The broker keeps only what outlives one process and what it must guarantee:

* who holds each timeline (handles, devices, fences and reservations that name it), so that
  it is freed when nobody does, and charged to its maker's uid until then;
* fences: each is a set of points, one per timeline (``SYNC_IOC_MERGE`` keeps the later point
  of a timeline that both sides name); its ``Wait`` counts the points not yet reached, and when
  none is left the server signals its descriptor, which every holder sees turn readable;
* each buffer's reservation (``dma_resv``): the points writers and readers attached;
* waits (fences, cpu accesses parked on a reservation), indexed per timeline by point in a
  heap, so that a signal settles exactly the waits it reached. A timeline is watched (its
  eventfd in the broker's epoll) only while some wait is in its heap;
* that every wait ends in finite time: only the signaller makes a fence for a point not yet
  reached, which promises it; a promise not kept within ``max_fence_time`` fails the timeline
  with ETIMEDOUT, and the signaller's end (exit, crash, kill) fails it with ESRCH.

The hooks do the I/O: watching eventfds, waking waiters (a write to an eventfd that any holder
can make block, so never on the loop), shutting fence descriptors down, closing pages.
"""

from __future__ import annotations

import errno
import heapq
import itertools
from collections.abc import Callable, Iterable

from ..protocol import MAX_FENCE_TIMELINES, Access, BrokerError
from ._config import Config
from ._quota import Quotas
from ._records import Buffer, Device, Fence, Key, Reserved, Timeline, TimelineRef, Wait
from ._sync_hooks import QuietHooks, SyncHooks, SyncObserver
from ._timeline_page import TimelinePage

__all__ = ["Points", "QuietHooks", "Sync", "SyncHooks", "SyncObserver"]

Points = dict[int, tuple[Timeline, int]]  # one point per timeline, by timeline id
_PROMISES = 1024  # unkept promises remembered per timeline; past that, the last one is raised


class Sync:
    def __init__(
        self,
        config: Config,
        quotas: Quotas,
        ids: Callable[[str], int],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        hooks: SyncHooks,
    ) -> None:
        self.config = config
        self.quotas = quotas
        self._ids = ids
        self._clock = clock
        self._monotonic = monotonic
        self.hooks = hooks
        self.observer = SyncObserver()
        self.timelines: dict[int, Timeline] = {}
        self.handles: dict[Key, Timeline] = {}
        self.fences: dict[Key, Fence] = {}
        self._deadlines: list[tuple[float, int, Timeline]] = []
        self._seq = itertools.count()

    # --- timelines ---------------------------------------------------------------------

    def make_timeline(self, device: Device, name: str | None, page: TimelinePage) -> Timeline:
        """A timeline whose only signaller is ``device``; takes ``page`` (closed on refusal)."""
        try:
            self.quotas.charge_object(device.uid, "timelines")
        except BrokerError:
            page.close()
            raise
        timeline = Timeline(
            id=self._ids("timeline"),
            name=name,
            owner=device.uid,
            signaller=(device.id, device.name, device.pid),
            created=self._clock(),
            page=page,
            live=device,
        )
        self.timelines[timeline.id] = timeline
        self._hold(device, timeline)
        self.observer.timeline_added(timeline)
        return timeline

    def restore(self, timeline: Timeline) -> None:
        """A timeline kept across a restart: its signaller's device is gone, its handles hold it.

        A point promised before the restart gets a new max_fence_time from now.
        """
        self.timelines = dict(sorted({**self.timelines, timeline.id: timeline}.items()))
        self.quotas.charge_object_unchecked(timeline.owner, "timelines")
        page = timeline.page
        if page.value < page.promised:
            self._promise(timeline, page.promised)

    def _hold(self, device: Device, timeline: Timeline) -> None:
        ref = device.timelines.get(timeline.id)
        if ref is None:
            device.timelines[timeline.id] = timeline.holders[device.id] = TimelineRef(timeline=timeline)
        else:
            ref.count += 1

    def hold(self, device: Device, timeline: Timeline) -> None:
        """``device`` holds ``timeline`` (a stream's frame timeline, for a subscriber)."""
        self._hold(device, timeline)

    def held(self, device: Device, timeline_id: int) -> Timeline:
        ref = device.timelines.get(timeline_id)
        if ref is None:
            raise BrokerError(errno.EBADF, f"timeline {timeline_id} is not held by this device")
        return ref.timeline

    def add_handle(self, timeline: Timeline, key: Key, uid: int) -> None:
        """Record a minted timeline handle, charged to ``uid`` until its last copy is closed."""
        self.quotas.charge_handle(uid)
        timeline.handles[key] = uid
        self.handles[key] = timeline
        self.observer.handle_added(timeline, key)

    def import_timeline(self, device: Device, key: Key) -> Timeline:
        timeline = self.handles.get(key)
        if timeline is None:
            raise BrokerError(errno.EINVAL, "the descriptor is not a live timeline handle")
        self._hold(device, timeline)
        return timeline

    def release_timeline(self, device: Device, timeline_id: int) -> None:
        self.held(device, timeline_id)
        ref = device.timelines[timeline_id]
        ref.count -= 1
        if not ref.count:
            self._unhold(device, ref.timeline)

    def _unhold(self, device: Device, timeline: Timeline) -> None:
        """A device lets go; if it is the signaller, nobody can signal any more: ESRCH."""
        del device.timelines[timeline.id]
        del timeline.holders[device.id]
        if timeline.live is device:
            timeline.live = None
            self.fail(timeline, errno.ESRCH)
        self._maybe_free(timeline)

    def handle_closed(self, key: Key) -> bool:
        """The last copy of a handle or a fence was closed; False if it is neither of ours."""
        timeline = self.handles.pop(key, None)
        if timeline is not None:
            self.quotas.uncharge_handle(timeline.handles.pop(key))
            self.observer.handle_removed(timeline, key)
            self._maybe_free(timeline)
            return True
        fence = self.fences.pop(key, None)
        if fence is None:
            return False
        fence.wait.done = _nothing
        self.quotas.uncharge_object(fence.owner, "fences")
        self._unref(t for t, _ in fence.points.values())
        return True

    def _unref(self, timelines: Iterable[Timeline]) -> None:
        for timeline in timelines:
            timeline.refs -= 1
            self._maybe_free(timeline)

    def _maybe_free(self, timeline: Timeline) -> None:
        if timeline.alive or timeline.id not in self.timelines:
            return
        del self.timelines[timeline.id]
        timeline.promises.clear()
        self.quotas.uncharge_object(timeline.owner, "timelines")
        self.observer.timeline_removed(timeline)
        self.hooks.freed(timeline)

    def device_gone(self, device: Device) -> None:
        """Its holds go; so the signaller's end (exit, crash, kill) fails its timelines: ESRCH."""
        for ref in list(device.timelines.values()):
            self._unhold(device, ref.timeline)

    def fail(self, timeline: Timeline, err: int) -> None:
        """Fail every point of ``timeline`` not yet reached, wake its waiters, settle ours."""
        if timeline.page.fail(err):
            self.hooks.kick(timeline)
        timeline.promises.clear()
        self.woke(timeline)

    # --- fences ------------------------------------------------------------------------

    def fence_points(self, device: Device, timeline_id: int, point: int) -> Points:
        """The point of ``tl.fence(point)``: reached, or promised by its signaller."""
        timeline = self.held(device, timeline_id)
        if timeline.page.status(point) == 0:
            if timeline.live is not device:
                raise BrokerError(
                    errno.EINVAL,
                    f"point {point} of timeline {timeline_id} is not reached, and only its "
                    "signaller may make a fence for a future point",
                )
            self._promise(timeline, point)
        return {timeline.id: (timeline, point)}

    def _promise(self, timeline: Timeline, point: int) -> None:
        timeline.page.promise(point)  # page.promised is written for readers; the deadlines stay here
        promises = timeline.promises
        if promises and promises[-1][1] >= point:
            return  # an earlier promise of a later point already covers it
        deadline = self._monotonic() + self.config.max_fence_time
        if len(promises) >= _PROMISES:
            promises[-1] = (promises[-1][0], point)
            return
        promises.append((deadline, point))
        if len(promises) == 1:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), timeline))
            self.hooks.deadline(deadline)

    def fence(self, key: Key) -> Fence:
        fence = self.fences.get(key)
        if fence is None:
            raise BrokerError(errno.EINVAL, "the descriptor is not a live fence")
        return fence

    def merge(self, first: Fence, second: Fence) -> Points:
        """SYNC_IOC_MERGE: the union, keeping the later point of a timeline both name."""
        points = dict(first.points)
        for id, (timeline, point) in second.points.items():
            if id not in points or points[id][1] < point:
                points[id] = (timeline, point)
        _check_size(points)
        return points

    def check_fence_quota(self, uid: int) -> None:
        usage, limit = self.quotas.of(uid), self.config.max_fences_per_uid
        if usage.fences >= limit:
            raise BrokerError(
                errno.EDQUOT, f"uid {uid} owns {usage.fences} fences (max_fences_per_uid={limit})"
            )

    def add_fence(self, uid: int, key: Key, points: Points) -> Fence:
        """A fence for ``points`` behind handle ``key``; signalled at once if they all are."""
        self.quotas.charge_object(uid, "fences")
        for timeline, _ in points.values():
            timeline.refs += 1
        fence = Fence(
            key=key, owner=uid, points=points, created=self._clock(), wait=Wait(pending=0, done=_nothing)
        )
        self.fences[key] = fence
        fence.wait = self.park(points, lambda _: self.hooks.fence_done(fence))
        return fence

    # --- reservations ------------------------------------------------------------------

    def attach_fence(self, buffer: Buffer, fence: Fence, access: Access) -> None:
        """IMPORT_SYNC_FILE: add a fence's points to the reservation, as dma_resv_add_fence does.

        A point replaces one of the same timeline that is not later and whose use is the same
        or weaker (a write replaces reads and writes, a read replaces reads); reached ones go.
        """
        write = access.writes
        self._prune(buffer)
        entries = buffer.reservation
        added = [(t, p) for t, p in fence.points.values() if t.page.status(p) == 0]
        keep = [
            r
            for r in entries
            if not any(r.timeline is t and r.point <= p and (write or not r.write) for t, p in added)
        ]
        new = [Reserved(timeline=t, point=p, write=write) for t, p in added]
        limit = self.config.max_fences_per_buffer
        if len(keep) + len(new) > limit:
            raise BrokerError(
                errno.EDQUOT,
                f"buffer {buffer.id} would wait for more than {limit} points (max_fences_per_buffer)",
            )
        for r in new:
            r.timeline.refs += 1
        buffer.reservation = keep + new
        self._unref(r.timeline for r in entries if r not in keep)

    def reservation_points(self, buffer: Buffer, access: Access) -> Points:
        """EXPORT_SYNC_FILE and cpu access: for READ the writers, for WRITE and RW everyone."""
        self._prune(buffer)
        points: Points = {}
        for r in buffer.reservation:
            if access.writes or r.write:
                old = points.get(r.timeline.id)
                if old is None or old[1] < r.point:
                    points[r.timeline.id] = (r.timeline, r.point)
        _check_size(points)
        return points

    def _prune(self, buffer: Buffer) -> None:
        done = [r for r in buffer.reservation if r.timeline.page.status(r.point) != 0]
        if done:
            buffer.reservation = [r for r in buffer.reservation if r not in done]
            self._unref(r.timeline for r in done)

    def drop_reservation(self, buffer: Buffer) -> None:
        entries, buffer.reservation = buffer.reservation, []
        self._unref(r.timeline for r in entries)

    # --- waits -------------------------------------------------------------------------

    def park(self, points: Points, done: Callable[[Wait], None]) -> Wait:
        """A wait for ``points``; ``done`` runs once all are reached (at once if they are)."""
        wait = Wait(pending=0, done=done)
        for timeline, point in points.values():
            status = timeline.page.status(point)
            if status == 0:
                wait.pending += 1
                timeline.refs += 1
                heapq.heappush(timeline.waits, (point, next(self._seq), wait))
                if len(timeline.waits) == 1:
                    self.hooks.watch(timeline, True)  # wakes at once if signalled meanwhile
            else:
                _reached(wait, status)
        if not wait.pending:
            wait.status = wait.status or 1
            done(wait)
        return wait

    @staticmethod
    def cancel(wait: Wait) -> None:
        """Nobody waits for ``wait`` any more; its heap entries go as their points are reached."""
        wait.done = _nothing

    def woke(self, timeline: Timeline) -> None:
        """The timeline's eventfd was written: settle every wait its page now satisfies."""
        waits, page = timeline.waits, timeline.page
        settled = 0
        while waits:
            point, _, wait = waits[0]
            status = page.status(point)
            if status == 0:
                break
            heapq.heappop(waits)
            settled += 1
            _reached(wait, status)
            wait.pending -= 1
            if not wait.pending:
                wait.status = wait.status or 1
                wait.done(wait)
        if settled:
            if not waits:
                self.hooks.watch(timeline, False)
            timeline.refs -= settled
            self._maybe_free(timeline)

    def expire(self) -> float | None:
        """Fail the timelines whose promises are past due; returns the next deadline, if any."""
        now = self._monotonic()
        while self._deadlines:
            deadline, _, timeline = self._deadlines[0]
            if deadline > now:
                return deadline
            heapq.heappop(self._deadlines)
            promises = timeline.promises
            while promises and timeline.page.status(promises[0][1]) != 0:
                promises.popleft()  # kept, or failed already
            if not promises or timeline.id not in self.timelines:
                continue
            if promises[0][0] <= now:
                self.fail(timeline, errno.ETIMEDOUT)
            else:
                heapq.heappush(self._deadlines, (promises[0][0], next(self._seq), timeline))
        return None


def _check_size(points: Points) -> None:
    if len(points) > MAX_FENCE_TIMELINES:
        raise BrokerError(errno.E2BIG, f"a fence may name at most {MAX_FENCE_TIMELINES} timelines")


def _reached(wait: Wait, status: int) -> None:
    """Note a point reached or failed: the first failure is the wait's status."""
    if status < 0 and wait.status >= 0:
        wait.status = status


def _nothing(_: Wait) -> None:
    pass
