"""Exporters on the client side: the ``Exporter`` a program subclasses, and answering calls.

A device opened with ``exporter=obj`` supplies the memory of the buffers it makes with
``dev.export(size)`` and answers their ops, as a driver's ``dma_buf_ops`` do. The broker
forwards an importer's attach, map and cpu access to it as *calls*, and tells it of detach,
unmap, end of cpu access and release afterwards (*notices*, which need no answer). What to
do with a call and how to answer it is decided here, once, without I/O; the blocking client
runs it on a thread of its own and the trio client in its nursery (``CallServer``).

What ``map`` and ``begin_cpu_access`` return: one memfd (the broker lays it out for the
importer), or ``(memfd, segments)``, segments all as long as the first but the last. The memfd
must hold exactly the buffer's page-rounded size, be sealed ``F_SEAL_SHRINK`` and
``F_SEAL_GROW`` and not against writing, and be open read-write (the ``export_memfd`` rules);
it stays the exporter's: the library sends a copy and closes nothing.
"""

from __future__ import annotations

import errno

from .. import protocol as p
from ..protocol import BrokerError, Constraints, Segment
from ..protocol._record import Record

TYPE_CHECKING = False  # neither typing nor logging at import: bufbroker's start-up pays for this module
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from logging import Logger
    from typing import Any

    from ..protocol import Access, Direction

    MapResult = int | tuple[int | Sequence[int], Sequence[Segment]]
    """A memfd, or a memfd (or a list of one) and its scatter list."""

__all__ = ["CallServer", "Exporter", "ExporterAttachment", "MoveCallbacks"]


def _log() -> Logger:
    import logging

    return logging.getLogger("bufbroker.client")


class ExporterAttachment(Record):
    """An importer's attachment to one of this exporter's buffers, as ``attach`` saw it."""

    id: int
    buffer: int  # the buffer's id
    device: str = "?"  # the importer's device name
    pid: int = 0
    constraints: Constraints = Constraints()
    dynamic: bool = False  # told of moves (it re-maps) instead of pinning the buffer


class Exporter:
    """The ops of the buffers a device exports (``dma_buf_ops``). Subclass and override.

    Any method may raise ``BrokerError``; for ``attach``, ``map`` and ``begin_cpu_access``
    its errno reaches the importer. The others are told after the fact and cannot refuse.
    With the trio client, methods may be coroutines. Do not wait in them on a call that this
    same exporter must answer: calls are served one after another.
    """

    def attach(self, attachment: ExporterAttachment) -> None:
        """An importer attaches; raise (EBUSY, EINVAL...) to refuse it."""

    def detach(self, attachment: ExporterAttachment) -> None:
        """An importer detached (or went away)."""

    def map(self, attachment: ExporterAttachment, direction: Direction) -> MapResult:
        """The memory an importer maps: a memfd, or ``(memfd, segments)``."""
        raise BrokerError(errno.EOPNOTSUPP, "this exporter does not map its buffers")

    def unmap(self, attachment: ExporterAttachment) -> None:
        """An importer unmapped one mapping of ``attachment`` (or went away)."""

    def begin_cpu_access(self, buffer: int, access: Access) -> MapResult:
        """The memory the cpu is to see for ``buffer`` (its id), as ``map`` returns it."""
        raise BrokerError(errno.EOPNOTSUPP, "this exporter offers no cpu access")

    def end_cpu_access(self, buffer: int, access: Access) -> None:
        """A cpu access ended (or its holder went away)."""

    def release(self, buffer: int) -> None:
        """Nothing holds ``buffer`` any more, anywhere: its memory may go."""

    def error(self, event: dict[str, Any]) -> None:
        """The broker refused an answer of ours (``call``, ``op``, ``buffer``, ``errno``, ``message``)."""
        _log().warning("the broker refused our answer to %s: %s", event.get("op"), event.get("message"))


class CallServer:
    """Turns calls into method calls on an ``Exporter``, and their outcomes into answers."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self._attachments: dict[int, ExporterAttachment] = {}

    def method(self, call: p.Call) -> Callable[[], Any | Awaitable[Any]]:
        """What to run for ``call`` (call it, and await the result if it is awaitable)."""
        ex = self.exporter
        match call.args:
            case p.AttachCall() as a:
                att = ExporterAttachment(
                    id=a.attachment,
                    buffer=a.buffer,
                    device=a.device,
                    pid=a.pid,
                    constraints=a.constraints,
                    dynamic=a.dynamic,
                )
                return lambda: self._attach(att)
            case p.DetachCall(attachment=att_id, buffer=buffer):
                return lambda: ex.detach(self._known(att_id, buffer, forget=True))
            case p.MapCall(attachment=att_id, buffer=buffer, direction=direction):
                return lambda: ex.map(self._known(att_id, buffer), direction)
            case p.UnmapCall(attachment=att_id, buffer=buffer):
                return lambda: ex.unmap(self._known(att_id, buffer))
            case p.BeginCpuCall(buffer=buffer, access=access):
                return lambda: ex.begin_cpu_access(buffer, access)
            case p.EndCpuCall(buffer=buffer, access=access):
                return lambda: ex.end_cpu_access(buffer, access)
            case p.ReleaseCall(buffer=buffer):
                return lambda: ex.release(buffer)
        raise p.ProtocolError(f"the broker sent an unknown call {call.op!r}")

    def _attach(self, att: ExporterAttachment) -> Any:
        """The exporter's attach; the attachment is remembered once it accepted."""
        value: Any = self.exporter.attach(att)  # type: ignore[func-returns-value]
        if CallServer.is_awaitable(value):  # the trio client's exporter may be a coroutine

            async def accepted() -> None:
                await value
                self._attachments[att.id] = att

            return accepted()
        self._attachments[att.id] = att
        return None

    def _known(self, att_id: int, buffer: int, *, forget: bool = False) -> ExporterAttachment:
        known = self._attachments.pop(att_id, None) if forget else self._attachments.get(att_id)
        return known if known is not None else ExporterAttachment(id=att_id, buffer=buffer)

    @staticmethod
    def answer(
        call: p.Call, value: Any = None, error: BaseException | None = None
    ) -> tuple[bytes, list[int]] | None:
        """The packet (and descriptors, still the exporter's) that answers ``call``; None for a
        notice. An exception other than BrokerError is logged and answered EIO."""
        if call.id is None:
            if error is not None and not isinstance(error, BrokerError):
                _log().error("the exporter failed on %s", call.op, exc_info=error)
            return None
        if error is not None:
            if not isinstance(error, BrokerError):
                _log().error("the exporter failed on %s", call.op, exc_info=error)
                error = BrokerError(errno.EIO, f"the exporter failed: {error!r}")
            refusal = p.Refusal(call.id, error.errno or errno.EIO, error.strerror or "")
            return p.encode(refusal), []
        if isinstance(call.args, p.MapCall | p.BeginCpuCall):
            try:
                return _backing_answer(call.id, value)
            except (TypeError, ValueError) as e:
                _log().error(
                    "the exporter's %s returned %r, not a memfd or (memfd, segments)", call.op, value
                )
                return p.encode(p.Refusal(call.id, errno.EIO, f"the exporter returned garbage: {e}")), []
        return p.encode(p.Answer(call.id, {})), []

    @staticmethod
    def failed(call: p.Call, error: OSError) -> bytes:
        """The refusal to send when the answer itself could not be sent (a bad descriptor)."""
        assert call.id is not None
        return p.encode(p.Refusal(call.id, errno.EIO, f"the exporter's answer could not be sent: {error}"))

    def event(self, event: p.Event) -> None:
        """An event for the exporter: the broker refused one of its answers."""
        if event.name == "exporter_error":
            self.exporter.error(event.args)

    @staticmethod
    def run(method: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        """Run a synchronous method: (value, None) or (None, the exception)."""
        try:
            return method(), None
        except Exception as e:
            return None, e

    @staticmethod
    def is_awaitable(value: Any) -> bool:
        """A coroutine or another awaitable (without importing ``inspect``)."""
        return hasattr(value, "__await__")


class MoveCallbacks:
    """The dynamic attachments of a device, and what to call when their buffer moves."""

    def __init__(self) -> None:
        self._callbacks: dict[int, tuple[Any, Callable[[Any], Any]]] = {}

    def add(self, attachment: Any, callback: Callable[[Any], Any]) -> None:
        self._callbacks[attachment.id] = (attachment, callback)

    def discard(self, attachment_id: int) -> None:
        self._callbacks.pop(attachment_id, None)

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def callback(self, event: p.Event) -> Callable[[], Any] | None:
        """What to run for ``event``: a dynamic attachment's ``on_move``, if it is a move."""
        if event.name != "move":
            return None
        entry = self._callbacks.get(event.args.get("attachment"))  # type: ignore[arg-type]
        if entry is None:
            return None
        attachment, callback = entry
        return lambda: callback(attachment)


def _backing_answer(id: int, value: Any) -> tuple[bytes, list[int]]:
    if isinstance(value, int):
        return p.encode(p.Answer(id, {})), [value]
    memfds, segments = value
    fds = [memfds] if isinstance(memfds, int) else list(memfds)
    wire = [Segment(*s).to_wire() if not isinstance(s, Segment) else s.to_wire() for s in segments]
    return p.encode(p.Answer(id, {"segments": wire})), fds
