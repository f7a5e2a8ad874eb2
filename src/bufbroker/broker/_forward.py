"""Forwarding an importer's request to the exporter of a remote buffer, without trusting it.

Each forwarded request runs in a task of the importer's connection (counted among its
pending requests), so neither the loop nor the importer's other requests wait on an
exporter. A call is counted against its exporter (``max_exporter_calls``, EAGAIN beyond),
waits at most ``exporter_call_timeout`` (ETIMEDOUT), and its answer's memfd is checked in a
worker thread (``_answers``), at most two at a time per exporter uid. An answer that comes
after its call gave up is dropped, its descriptors closed off the loop.

What the importer asked for is applied to the state first and undone if the call fails, so
that a concurrent detach sees the mapping in progress (EBUSY) and nothing is granted twice.
If the exporter refused, it is not told of the undo; if it timed out, answered garbage or
went away, it is (it may have done the work): unmap after map, detach after attach, end
after begin.
"""

from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING, Any

import trio

from .. import protocol as p
from ..protocol import BrokerError, Constraints
from ._answers import backing
from ._backing_ops import map_result
from ._exports import begin_call, end_call, move
from ._records import Buffer, Device, PendingCall

if TYPE_CHECKING:
    from ._packets import FdBag
    from ._server import Server

__all__ = ["Forwarder"]



class _Slot:
    __slots__ = ("answer", "call", "done", "error")

    def __init__(self, call: PendingCall) -> None:
        self.call = call
        self.done = trio.Event()
        self.answer: p.Answer | p.Refusal | None = None
        self.error: BrokerError | None = None


class _Refused(BrokerError):
    """The exporter said no, or was never asked: the importer gets the errno, and the exporter
    is not told of the undo."""


class Forwarder:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.state = server.state
        self._slots: dict[int, _Slot] = {}

    # --- which requests come here

    def wants(self, device: Device, args: p.OpArgs) -> bool:
        """Whether ``args`` (references resolved) needs an exporter's answer, or a move's wait."""
        match args:
            case p.Attach(buffer=int(buffer_id)) | p.CpuBegin(buffer=int(buffer_id)):
                ref = device.refs.get(buffer_id)
                return ref is not None and ref.buffer.remote is not None and not ref.buffer.revoked
            case p.Map(attachment=int(att_id)):
                att = device.attachments.get(att_id)
                return att is not None and att.buffer.remote is not None and not att.buffer.revoked
            case p.Move():
                return True
        return False

    async def answer(self, device: Device, args: p.OpArgs) -> tuple[Any, list[int]]:
        """The reply (result, descriptors) to a request ``wants`` took."""
        state = self.state
        match args:
            case p.Attach(buffer=int(buffer_id), dynamic=dynamic):
                att = state.attach(device, buffer_id, dynamic=dynamic)
                ask = p.AttachCall(
                    buffer=buffer_id,
                    attachment=att.id,
                    device=device.name,
                    pid=device.pid,
                    constraints=device.constraints,
                    dynamic=dynamic,
                )
                try:
                    await self._call(device, att.buffer, ask)
                except BrokerError as e:
                    state.drop_attachment(device, att.id, tell=not isinstance(e, _Refused))
                    raise
                return {"attachment": att.id}, []
            case p.Map(attachment=int(att_id), direction=direction):
                state.map(device, att_id, direction)
                buffer = device.attachments[att_id].buffer
                try:
                    mapping = p.MapCall(buffer=buffer.id, attachment=att_id, direction=direction)
                    return await self._backing(device, buffer, mapping, direction.writes, device.constraints)
                except BrokerError as e:
                    if att_id in device.attachments and device.attachments[att_id].map_count:
                        state.unmap(device, att_id, tell=not isinstance(e, _Refused))
                    raise
            case p.CpuBegin(buffer=int(buffer_id), access=access):
                state.cpu_begin(device, buffer_id, access)
                buffer = device.refs[buffer_id].buffer
                try:
                    begin = p.BeginCpuCall(buffer=buffer_id, access=access)
                    return await self._backing(device, buffer, begin, access.writes, Constraints())
                except BrokerError as e:
                    if device.cpu[(buffer_id, access)]:
                        state.cpu_end(device, buffer_id, access, tell=not isinstance(e, _Refused))
                    raise
            case p.Move(buffer=buffer_id, timeout=timeout):
                return await self._move(device, buffer_id, timeout), []
        raise BrokerError(errno.ENOTTY, "not a forwarded request")

    async def _move(self, device: Device, buffer_id: int, timeout: float | None) -> dict[str, Any]:
        buffer, waiting = move(self.state, device, buffer_id)
        try:
            with trio.move_on_after(self.state.config.exporter_call_timeout if timeout is None else timeout):
                while any(a.stale for a in waiting):
                    await self.server.unmapped.park()
        finally:
            buffer.moving -= 1
        late = [
            {"attachment": a.id, "device": a.device.id, "name": a.device.name, "pid": a.device.pid}
            for a in waiting
            if a.stale
        ]
        return {"late": late}

    # --- calls and answers

    async def _call(self, importer: Device, buffer: Buffer, args: p.OpArgs) -> p.Answer:
        """Ask ``buffer``'s exporter; its answer (the caller owns its descriptors)."""
        try:
            call = begin_call(self.state, importer, buffer, p.OP_NAMES[type(args)])
        except BrokerError as e:  # EAGAIN: too many calls in flight; this one is not sent
            raise _Refused(e.errno or errno.EAGAIN, e.strerror) from None
        slot = self._slots[call.id] = _Slot(call)
        try:
            self.server.post(call.exporter, p.Call(call.id, call.op, args))
            with trio.move_on_after(self.state.config.exporter_call_timeout):
                await slot.done.wait()
            answer, slot.answer = slot.answer, None
            if answer is None:
                raise slot.error or BrokerError(
                    errno.ETIMEDOUT,
                    f"the exporter {call.exporter.label} did not answer {call.op} within "
                    f"{self.state.config.exporter_call_timeout} s (exporter_call_timeout)",
                )
            if isinstance(answer, p.Refusal):
                raise _Refused(answer.errno, f"the exporter refused {call.op}: {answer.message}")
            if type(answer.result) is not dict:
                self.server.close_later(call.exporter.uid, answer.fds)
                raise self._garbage(call, BrokerError(errno.EIO, "the exporter's answer is not a map"))
            if answer.fds and not isinstance(args, p.MapCall | p.BeginCpuCall):
                self.server.close_later(call.exporter.uid, answer.fds)  # only memory answers carry any
            return answer
        finally:
            del self._slots[call.id]
            end_call(call)
            if slot.answer is not None:  # it came as this task was cancelled
                self.server.close_later(call.exporter.uid, slot.answer.fds)

    async def _backing(
        self, importer: Device, buffer: Buffer, args: p.OpArgs, writable: bool, constraints: Constraints
    ) -> tuple[Any, list[int]]:
        """A map or cpu access answered by the exporter, checked, as the importer's reply."""
        exporter = buffer.remote
        assert exporter is not None
        answer = await self._call(importer, buffer, args)
        check = functools.partial(
            backing,
            answer.result,
            list(answer.fds),
            buffer.span,
            constraints,
            writable,
            self.state.config.max_layout_segments,
        )
        try:  # in a worker thread of the exporter's uid, which owns the descriptors until it returns
            layout, fd = await self.server.workers.run(exporter.uid, check)
        except BrokerError as e:
            raise self._garbage(exporter, e, answer.id, args) from None
        reserve = self.state.reserve
        if not reserve.allows(importer.uid, fd):  # one of the descriptors kept for root
            self.server.close_later(importer.uid, [fd])  # maybe the memory's last reference
            reserve.check(importer.uid, [fd])
        result = map_result(layout.to_wire(), buffer.size, buffer.span, writable)
        return result, [fd]

    def _garbage(
        self,
        who: PendingCall | Device,
        error: BrokerError,
        id: int | None = None,
        args: p.OpArgs | None = None,
    ) -> BrokerError:
        """Tell the exporter what was wrong with its answer; the importer's error (EIO)."""
        if isinstance(who, PendingCall):
            exporter, id, op, buffer = who.exporter, who.id, who.op, who.buffer.id
        else:
            assert args is not None
            exporter, op, buffer = who, p.OP_NAMES[type(args)], getattr(args, "buffer", 0)
        self.server.post(
            exporter,
            p.Event(
                "exporter_error",
                {"call": id, "op": op, "buffer": buffer, "errno": error.errno, "message": error.strerror},
            ),
        )
        return error

    def answered(self, exporter: Device, message: p.Answer | p.Refusal, bag: FdBag) -> None:
        """An exporter's answer: to its waiting call, or dropped (late, or not its call)."""
        slot = self._slots.get(message.id)
        if slot is None or slot.call.exporter is not exporter or slot.done.is_set():
            return  # the bag discards its descriptors, off the loop
        fds = bag.take_all()
        slot.answer = type(message)(**{**message.__dict__, "fds": fds})
        slot.done.set()

    def abort(
        self, error: BrokerError, *, exporter: Device | None = None, buffer: Buffer | None = None
    ) -> None:
        """Fail the waiting calls to ``exporter``, or for ``buffer``, with ``error``."""
        for slot in self._slots.values():
            call = slot.call
            if (call.exporter is exporter or call.buffer is buffer) and not slot.done.is_set():
                slot.error = error
                slot.done.set()
