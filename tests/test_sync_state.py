"""The synchronisation model on its own: no sockets, no trio, real pages, a fake clock."""

from __future__ import annotations

import errno

from bufbroker.broker import Config, State
from bufbroker.broker._records import Fence, Timeline
from bufbroker.broker._sync import Sync
from bufbroker.broker._timeline_page import TimelinePage
from bufbroker.protocol import Access, Constraints
from bufbroker.protocol import timeline as page


class Hooks:
    """Records what the model asks of the server."""

    def __init__(self) -> None:
        self.watched: set[int] = set()
        self.kicked: list[int] = []
        self.done: list[Fence] = []
        self.gone: list[int] = []

    def watch(self, timeline: Timeline, on: bool) -> None:
        (self.watched.add if on else self.watched.discard)(timeline.id)

    def kick(self, timeline: Timeline) -> None:
        self.kicked.append(timeline.id)

    def fence_done(self, fence: Fence) -> None:
        self.done.append(fence)

    def deadline(self, when: float) -> None:
        pass

    def freed(self, timeline: Timeline) -> None:
        self.gone.append(timeline.id)
        timeline.page.close()


def _setup(**limits: float) -> tuple[State, Sync, Hooks, list[float]]:
    state = State(Config(**limits))  # type: ignore[arg-type]
    now = [100.0]
    hooks = Hooks()
    sync = Sync(state.config, state.quotas, state.new_id, state.clock, lambda: now[0], hooks)
    state.sync = sync
    return state, sync, hooks, now


def _device(state: State, uid: int = 1000):  # type: ignore[no-untyped-def]
    return state.add_device(name="d", pid=1, uid=uid, gid=uid, command="t", constraints=Constraints())


def test_a_timeline_is_watched_only_while_something_waits_on_it() -> None:
    state, sync, hooks, _ = _setup()
    dev = _device(state)
    tl = sync.make_timeline(dev, "t", TimelinePage.create("t"))
    fence = sync.add_fence(dev.uid, 1, sync.fence_points(dev, tl.id, 2))
    assert hooks.watched == {tl.id} and fence.wait.pending == 1
    page.signal(tl.page.slots, 1, 0, 0)
    sync.woke(tl)
    assert hooks.watched == {tl.id} and not hooks.done
    page.signal(tl.page.slots, 2, 0, 0)
    sync.woke(tl)
    assert hooks.watched == set() and hooks.done == [fence] and fence.wait.status == 1


def test_an_unkept_promise_fails_the_timeline_at_its_deadline() -> None:
    state, sync, hooks, now = _setup(max_fence_time=10.0)
    dev = _device(state)
    tl = sync.make_timeline(dev, None, TimelinePage.create("t"))
    fence = sync.add_fence(dev.uid, 1, sync.fence_points(dev, tl.id, 3))
    assert sync.expire() == 110.0
    now[0] = 109.0
    assert sync.expire() == 110.0 and not hooks.kicked
    now[0] = 110.0
    assert sync.expire() is None
    assert hooks.kicked == [tl.id] and fence.wait.status == -errno.ETIMEDOUT
    assert page.error(tl.page.slots) == errno.ETIMEDOUT and page.error_point(tl.page.slots) == 1


def test_a_kept_promise_costs_nothing() -> None:
    state, sync, hooks, now = _setup(max_fence_time=10.0)
    dev = _device(state)
    tl = sync.make_timeline(dev, None, TimelinePage.create("t"))
    sync.fence_points(dev, tl.id, 3)
    page.signal(tl.page.slots, 3, 0, 0)
    now[0] = 200.0
    assert sync.expire() is None and not hooks.kicked and page.error(tl.page.slots) == 0


def test_the_signallers_end_fails_with_esrch_and_frees_what_nobody_holds() -> None:
    state, sync, hooks, _ = _setup()
    dev, other = _device(state), _device(state)
    kept = sync.make_timeline(dev, None, TimelinePage.create("kept"))
    lone = sync.make_timeline(dev, None, TimelinePage.create("lone"))
    sync.add_handle(kept, 99, dev.uid)
    sync.import_timeline(other, 99)
    page.signal(kept.page.slots, 4, 0, 0)
    state.remove_device(dev)
    assert hooks.gone == [lone.id] and kept.id in sync.timelines
    assert page.point_status(kept.page.slots, 4) == 1
    assert page.point_status(kept.page.slots, 5) == -errno.ESRCH
    assert state.quotas.of(1000).timelines == 1


def test_a_reservation_follows_dma_resv_add_fence() -> None:
    state, sync, _, _ = _setup()
    dev = _device(state)
    buf = state.allocate(dev, 4096, name=None, heap="memfd")
    a = sync.make_timeline(dev, None, TimelinePage.create("a"))
    b = sync.make_timeline(dev, None, TimelinePage.create("b"))

    def fence(tl: Timeline, point: int, key: int) -> Fence:
        return sync.add_fence(dev.uid, key, sync.fence_points(dev, tl.id, point))

    sync.attach_fence(buf, fence(a, 1, 1), Access.READ)
    sync.attach_fence(buf, fence(b, 1, 2), Access.WRITE)
    sync.attach_fence(buf, fence(a, 2, 3), Access.READ)  # replaces a's read at 1
    assert [(r.timeline.id, r.point, r.write) for r in buf.reservation] == [(b.id, 1, True), (a.id, 2, False)]
    assert set(sync.reservation_points(buf, Access.READ)) == {b.id}
    assert set(sync.reservation_points(buf, Access.RW)) == {a.id, b.id}
    page.signal(b.page.slots, 1, 0, 0)
    assert sync.reservation_points(buf, Access.READ) == {}
    assert len(buf.reservation) == 1
