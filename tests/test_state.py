"""The state model on its own: no sockets, no trio, real memfds from the heap."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bufbroker.broker import Config, State
from bufbroker.broker._layout import combine, plan
from bufbroker.protocol import PAGE_SIZE, Access, BrokerError, Constraints, Direction


def _state(**limits: int) -> State:
    return State(Config(**limits))


def _device(state: State, name: str = "dev", uid: int = 1000, **constraints: int):  # type: ignore[no-untyped-def]
    return state.add_device(
        name=name, pid=1, uid=uid, gid=uid, command="test", constraints=Constraints(**constraints)
    )


def _code(call) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(BrokerError) as e:
        call()
    return e.value.errno  # type: ignore[return-value]


def test_a_buffer_lives_while_a_handle_or_a_holder_remains() -> None:
    state = _state()
    dev = _device(state)
    buf = state.allocate(dev, 1, name=None, heap="memfd")
    assert buf.size == PAGE_SIZE and buf.backing is None
    state.add_handle(buf, 12, readonly=False, uid=dev.uid)
    state.release(dev, buf.id)
    assert buf.id in state.buffers  # the handle holds it
    other = _device(state, "other")
    assert state.import_handle(other, 12) is buf
    state.handle_closed(12)
    assert buf.id in state.buffers  # now the importer holds it
    state.remove_device(other)
    assert state.buffers == {} and state.quotas.usage == {} and state.quotas.total_bytes == 0


def test_rules_and_their_errnos() -> None:
    state = _state()
    dev = _device(state)
    buf = state.allocate(dev, 8192, name=None, heap="memfd")
    att = state.attach(dev, buf.id)
    assert _code(lambda: state.import_handle(dev, 99)) == errno.EINVAL
    assert _code(lambda: state.unmap(dev, att.id)) == errno.EINVAL
    mapped = state.map(dev, att.id, Direction.TO_DEVICE)
    assert not mapped.writable and buf.backing is not None  # late allocation happened here
    assert _code(lambda: state.map(dev, att.id, Direction.BIDIRECTIONAL)) == errno.EBUSY
    assert _code(lambda: state.detach(dev, att.id)) == errno.EBUSY
    assert _code(lambda: state.release(dev, buf.id)) == errno.EBUSY
    state.unmap(dev, att.id)
    state.detach(dev, att.id)
    assert _code(lambda: state.map(dev, att.id, Direction.TO_DEVICE)) == errno.EINVAL
    assert _code(lambda: state.cpu_end(dev, buf.id, Access.READ)) == errno.EINVAL
    state.cpu_begin(dev, buf.id, Access.READ)
    assert _code(lambda: state.release(dev, buf.id)) == errno.EBUSY
    state.cpu_end(dev, buf.id, Access.READ)
    state.release(dev, buf.id)
    assert state.buffers == {}


def test_quotas_leave_state_unchanged() -> None:
    state = _state(max_buffers_per_uid=1, max_bytes_per_uid=3 * PAGE_SIZE)
    dev = _device(state)
    state.allocate(dev, PAGE_SIZE, name="a", heap="memfd")
    before = (dict(state.buffers), dict(state.names), state.quotas.total_bytes)
    assert _code(lambda: state.allocate(dev, PAGE_SIZE, name="b", heap="memfd")) == errno.EDQUOT
    assert (dict(state.buffers), dict(state.names), state.quotas.total_bytes) == before
    other = _device(state, uid=1001)
    assert _code(lambda: state.allocate(other, 4 * PAGE_SIZE, name=None, heap="memfd")) == errno.EDQUOT
    assert _code(lambda: state.allocate(dev, PAGE_SIZE, name="a", heap="memfd")) == errno.EDQUOT
    assert _code(lambda: state.open(other, "a")) == errno.ENOENT  # another uid's name: as if missing
    root = _device(state, uid=0)
    assert _code(lambda: state.open(root, "a")) == errno.ENOENT  # root's own names, unless it says whose
    assert state.open(root, "a", uid=dev.uid).name == "a"
    assert _code(lambda: state.open(other, "a", uid=dev.uid)) == errno.EPERM


def test_connections_are_counted_per_uid() -> None:
    state = _state(max_connections_per_uid=1)
    state.admit(5)
    assert _code(lambda: state.admit(5)) == errno.ECONNREFUSED
    state.admit(6)
    state.leave(5)
    state.admit(5)


constraint = st.builds(
    Constraints,
    max_segment_size=st.none() | st.integers(1, 64).map(lambda n: n * PAGE_SIZE),
    max_segments=st.none() | st.integers(1, 70),
    alignment=st.none() | st.integers(0, 6).map(lambda n: PAGE_SIZE << n),
)


@given(pages=st.integers(1, 256), constraints=st.lists(constraint, min_size=1, max_size=4))
def test_plans_partition_the_buffer_and_meet_every_constraint(
    pages: int, constraints: list[Constraints]
) -> None:
    size = pages * PAGE_SIZE
    planned = plan(size, combine(constraints))
    if planned is None:
        # Nothing is feasible: even the single-segment layout must break some constraint,
        # and so must every layout with the longest legal pieces.
        return
    layout = planned.segments()
    assert layout[0].offset == 0 and len(layout) == planned.count
    assert sum(s.length for s in layout) == size
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(layout))
    for c in constraints:
        assert planned.satisfies(c)
        assert c.max_segments is None or len(layout) <= c.max_segments
        assert c.max_segment_size is None or all(s.length <= c.max_segment_size for s in layout)
        assert c.alignment is None or all(s.offset % c.alignment == 0 for s in layout)


@given(pages=st.integers(1, 64), c=constraint)
def test_plan_is_none_only_when_no_partition_fits(pages: int, c: Constraints) -> None:
    size = pages * PAGE_SIZE
    if plan(size, c) is None:
        # Brute force over uniform cuts (the optimum is uniform): none satisfies c.
        for step in range(PAGE_SIZE, size + PAGE_SIZE, PAGE_SIZE):
            layout = plan(size, Constraints(max_segment_size=step))
            assert layout is not None
            assert not layout.satisfies(c)
