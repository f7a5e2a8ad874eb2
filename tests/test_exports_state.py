"""The state model's rules for buffers an exporter supplies, on their own: no sockets, no trio."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from bufbroker import protocol as p
from bufbroker.broker import Config, State
from bufbroker.broker._exports import begin_call, end_call, export_remote, move, revoke
from bufbroker.protocol import Access, BrokerError, Constraints, Direction


def _setup(**limits: Any) -> tuple[State, Any, Any, list[tuple[str, Any]]]:
    state = State(Config(**limits))
    posted: list[tuple[str, Any]] = []
    state.post = lambda device, message: posted.append((device.name, message))
    exporter = state.add_device(
        name="exporter", pid=1, uid=1000, gid=1000, command="x", constraints=Constraints(), exporter=True
    )
    importer = state.add_device(
        name="importer", pid=2, uid=1000, gid=1000, command="y", constraints=Constraints()
    )
    return state, exporter, importer, posted


def _code(call: Any) -> int:
    with pytest.raises(BrokerError) as e:
        call()
    return e.value.errno or 0


def _notices(posted: list[tuple[str, Any]]) -> list[str]:
    return [m.op for who, m in posted if who == "exporter" and isinstance(m, p.Call)]


def test_teardown_is_told_to_the_exporter_in_order_and_release_last() -> None:
    state, exporter, importer, posted = _setup()
    buf = export_remote(state, exporter, 5000, name="r")
    assert buf.size == 8192 and buf.remote is exporter and buf.backing is None
    state.open(importer, "r", None)
    att = state.attach(importer, buf.id, dynamic=True)
    assert state.map(importer, att.id, Direction.TO_DEVICE) is None  # the exporter answers
    assert state.cpu_begin(importer, buf.id, Access.READ) is None
    state.remove_device(importer)  # its process died holding everything
    assert _notices(posted) == ["unmap", "detach", "end_cpu_access"]
    state.release(exporter, buf.id)
    assert _notices(posted)[-1] == "release" and buf.id not in state.buffers


def test_an_exporter_that_goes_revokes_and_tells_every_holder() -> None:
    state, exporter, importer, posted = _setup()
    buf = export_remote(state, exporter, 4096, name=None)
    state._add_ref(importer, buf, writable=True)
    att = state.attach(importer, buf.id)
    state.map(importer, att.id, Direction.TO_DEVICE)
    state.remove_device(exporter)
    assert buf.revoked and ("importer", p.Event("revoked", {"buffer": buf.id})) in posted
    assert _code(lambda: state.map(importer, att.id, Direction.TO_DEVICE)) == errno.ENODEV
    assert _code(lambda: state.attach(importer, buf.id)) == errno.ENODEV
    assert _code(lambda: state.cpu_begin(importer, buf.id, Access.READ)) == errno.ENODEV
    before = len(posted)
    state.unmap(importer, att.id)  # teardown still works, and tells nobody: the exporter is gone
    state.detach(importer, att.id)
    state.release(importer, buf.id)
    assert len(posted) == before and buf.id not in state.buffers


def test_revoke_and_move_belong_to_the_exporter() -> None:
    state, exporter, importer, _ = _setup()
    buf = export_remote(state, exporter, 4096, name=None)
    state._add_ref(importer, buf, writable=True)
    assert _code(lambda: revoke(state, importer, buf.id)) == errno.EPERM
    assert _code(lambda: move(state, importer, buf.id)) == errno.EPERM
    assert _code(lambda: export_remote(state, importer, 4096, name=None)) == errno.EOPNOTSUPP
    assert _code(lambda: export_remote(state, exporter, 0, name=None)) == errno.EINVAL


def test_a_move_waits_for_stale_mappings_and_a_static_attachment_pins() -> None:
    state, exporter, importer, posted = _setup()
    woken: list[int] = []
    state.unmapped = lambda buffer: woken.append(buffer.id)
    buf = export_remote(state, exporter, 4096, name=None)
    state._add_ref(importer, buf, writable=True)
    dynamic = state.attach(importer, buf.id, dynamic=True)
    state.map(importer, dynamic.id, Direction.TO_DEVICE)
    state.map(importer, dynamic.id, Direction.TO_DEVICE)
    static = state.attach(importer, buf.id)
    assert _code(lambda: move(state, exporter, buf.id)) == errno.EBUSY
    state.detach(importer, static.id)
    _, waiting = move(state, exporter, buf.id)
    assert waiting == [dynamic] and dynamic.stale == 2 and buf.moving == 1
    assert ("importer", p.Event("move", {"buffer": buf.id, "attachment": dynamic.id})) in posted
    state.map(importer, dynamic.id, Direction.TO_DEVICE)  # the new memory, before letting go
    state.unmap(importer, dynamic.id)
    state.unmap(importer, dynamic.id)
    assert dynamic.stale == 0 and dynamic.map_count == 1 and woken == [buf.id, buf.id]
    state.cpu_begin(importer, buf.id, Access.READ)
    assert _code(lambda: move(state, exporter, buf.id)) == errno.EBUSY  # the cpu sees old memory


def test_another_uid_gets_at_most_half_of_an_exporters_calls() -> None:
    state, exporter, _, _ = _setup(max_exporter_calls=4)
    stranger = state.add_device(name="s", pid=3, uid=2000, gid=2000, command="z", constraints=Constraints())
    own = state.add_device(name="o", pid=4, uid=1000, gid=1000, command="w", constraints=Constraints())
    buf = export_remote(state, exporter, 4096, name=None)
    for _ in range(2):
        begin_call(state, stranger, buf, "map")
    assert _code(lambda: begin_call(state, stranger, buf, "map")) == errno.EAGAIN
    for _ in range(2):  # the exporter's own uid may use the rest
        begin_call(state, own, buf, "map")
    assert _code(lambda: begin_call(state, own, buf, "map")) == errno.EAGAIN


def test_calls_in_flight_are_capped_per_exporter() -> None:
    state, exporter, importer, _ = _setup(max_exporter_calls=2)
    buf = export_remote(state, exporter, 4096, name=None)
    calls = [begin_call(state, importer, buf, "map") for _ in range(2)]
    assert _code(lambda: begin_call(state, importer, buf, "map")) == errno.EAGAIN
    end_call(calls[0])
    end_call(begin_call(state, importer, buf, "map"))
    assert len(exporter.calls) == 1


def test_revoke_fails_the_exporters_timelines_the_reservation_waits_on() -> None:
    """Work promised on memory the exporter took back will never be done: its waiters get ENODEV."""
    from bufbroker.broker._timeline_page import TimelinePage

    state, exporter, importer, _ = _setup()
    buf = export_remote(state, exporter, 4096, name=None)
    state._add_ref(importer, buf, writable=True)
    sync = state.sync
    render = sync.make_timeline(exporter, "render", TimelinePage.create("render"))
    other = sync.make_timeline(importer, "other", TimelinePage.create("other"))
    try:
        writing = sync.add_fence(exporter.uid, 1, sync.fence_points(exporter, render.id, 5))
        reading = sync.add_fence(importer.uid, 2, sync.fence_points(importer, other.id, 3))
        sync.attach_fence(buf, writing, Access.WRITE)
        sync.attach_fence(buf, reading, Access.READ)
        revoke(state, exporter, buf.id)
        assert render.page.status(5) == -errno.ENODEV  # the exporter's: failed
        assert other.page.status(3) == 0  # the importer's own work is not the exporter's to fail
    finally:
        render.page.close()
        other.page.close()
