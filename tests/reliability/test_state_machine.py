"""Random sequences of every state-model operation, with the model's invariants after each.

Like h2's and wsproto's state tests: any operation in any state either applies or raises the
protocol's own error with an errno, and the books always balance.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from bufbroker.broker import Config, State
from bufbroker.broker._records import Device
from bufbroker.protocol import PAGE_SIZE, Access, BrokerError, Constraints, Direction

T = TypeVar("T")

ids = st.integers(0, 12)
sizes = st.sampled_from([1, PAGE_SIZE, 3 * PAGE_SIZE, 64 * PAGE_SIZE])
constraints = st.sampled_from(
    [
        Constraints(),
        Constraints(max_segments=1),
        Constraints(max_segment_size=PAGE_SIZE),
        Constraints(alignment=4 * PAGE_SIZE),
        Constraints(max_segments=2, max_segment_size=8 * PAGE_SIZE),
    ]
)


class Model(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = State(Config(max_buffers_per_uid=8, max_bytes_per_uid=64 * PAGE_SIZE))
        self.devices = [self._device(c) for c in (Constraints(), Constraints(max_segments=1))]
        self.keys = 0
        self.closed_fds: set[int] = set()

    def _device(self, c: Constraints) -> Device:
        uid = len(getattr(self, "devices", [])) % 2
        return self.state.add_device(name="d", pid=1, uid=uid, gid=uid, command="t", constraints=c)

    def _try(self, op: Callable[..., T], *args: object) -> T | None:
        try:
            return op(*args)
        except BrokerError as e:
            assert e.errno, e
            return None

    def _dev(self, i: int) -> Device:
        return self.devices[i % len(self.devices)]

    @rule(c=constraints)
    def connect(self, c: Constraints) -> None:
        if len(self.devices) < 5:
            self.devices.append(self._device(c))

    @rule(d=ids)
    def disconnect(self, d: int) -> None:
        if len(self.devices) > 1:
            self.state.remove_device(self.devices.pop(d % len(self.devices)))

    @rule(d=ids, size=sizes, named=st.booleans())
    def allocate(self, d: int, size: int, named: bool) -> None:
        buf = self._try(
            lambda: self.state.allocate(self._dev(d), size, name=f"n{size}" if named else None, heap="memfd")
        )
        if buf is not None and named is False:
            self.keys += 1
            self.state.add_handle(buf, self.keys, readonly=bool(self.keys % 2), uid=buf.owner)

    @rule(key=ids)
    def close_handle(self, key: int) -> None:
        self.state.handle_closed(key)

    @rule(d=ids, key=ids)
    def import_handle(self, d: int, key: int) -> None:
        self._try(self.state.import_handle, self._dev(d), key)

    @rule(d=ids, b=ids)
    def release(self, d: int, b: int) -> None:
        self._try(self.state.release, self._dev(d), b)

    @rule(d=ids, b=ids)
    def attach(self, d: int, b: int) -> None:
        self._try(self.state.attach, self._dev(d), b)

    @rule(d=ids, a=ids)
    def detach(self, d: int, a: int) -> None:
        self._try(self.state.detach, self._dev(d), a)

    @rule(d=ids, a=ids, direction=st.sampled_from(list(Direction)))
    def map(self, d: int, a: int, direction: Direction) -> None:
        self._try(self.state.map, self._dev(d), a, direction)

    @rule(d=ids, a=ids)
    def unmap(self, d: int, a: int) -> None:
        self._try(self.state.unmap, self._dev(d), a)

    @rule(d=ids, b=ids, access=st.sampled_from(list(Access)), begin=st.booleans())
    def cpu(self, d: int, b: int, access: Access, begin: bool) -> None:
        self._try(self.state.cpu_begin if begin else self.state.cpu_end, self._dev(d), b, access)

    @rule(d=ids, b=ids, name=st.sampled_from([None, "a", "b", "x" * 31]))
    def set_name(self, d: int, b: int, name: str | None) -> None:
        self._try(self.state.set_name, self._dev(d), b, name)

    @invariant()
    def books_balance(self) -> None:
        state = self.state
        for buf in state.buffers.values():
            assert buf.alive  # nothing lives without a handle or a holder
            assert sum((buf.attached or {}).values()) == len(buf.attachments)
            for att in buf.attachments.values():
                assert buf.id in att.device.refs  # attachments only under a hold
                assert (att.map_count == 0) == (att.direction is None)
            if buf.layout is not None:
                assert sum(s.length for s in buf.layout.segments()) == buf.size
        per_uid: dict[int, tuple[int, int]] = {}
        for buf in state.buffers.values():
            n, b = per_uid.get(buf.owner, (0, 0))
            per_uid[buf.owner] = (n + 1, b + buf.size)
        handles: dict[int, int] = {}
        for handle in state.handles.values():
            handles[handle.uid] = handles.get(handle.uid, 0) + 1
        for uid, usage in state.quotas.usage.items():
            assert (usage.buffers, usage.bytes) == per_uid.get(uid, (0, 0))
            assert usage.handles == handles.get(uid, 0)
        assert state.quotas.total_bytes == sum(b.size for b in state.buffers.values())
        assert all(
            buf.name == name and buf.owner == owner and buf.id in state.buffers
            for (owner, name), buf in state.names.items()
        )

    def teardown(self) -> None:
        backings = [b.backing for b in self.state.buffers.values() if b.backing is not None]
        for device in list(self.devices):
            self.state.remove_device(device)
        for key in range(self.keys + 1):
            self.state.handle_closed(key)
        quotas = self.state.quotas
        assert self.state.buffers == {} and quotas.usage == {} and quotas.total_bytes == 0
        for backing in backings:  # freed buffers closed their memfds
            assert backing.fd == -1
        assert os.getpid()


TestModel = Model.TestCase
TestModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
