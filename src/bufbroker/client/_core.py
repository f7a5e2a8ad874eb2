"""What the blocking and trio clients share: every decision that needs no I/O.

``Session`` numbers requests, encodes them, decodes what comes back and turns errors into
exceptions. The ``*Base`` classes hold the objects' data and local resources (handle fds,
mmaps); the blocking and trio modules add only the methods that talk to the broker, with the
same names in the same order (like httpx's Client and AsyncClient).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
from typing import Any, Protocol

from .. import protocol as p
from ..protocol import Access, BrokerError, Constraints, Direction, Segment
from ._memory import MappedMemory, segments_from_wire
from ._timeline import FenceBase, TimelineBase, Views

__all__ = [
    "MAX_REPLY",
    "MAX_REPLY_FDS",
    "AttachmentBase",
    "BufferBase",
    "CpuAccessBase",
    "DeviceBase",
    "MappingBase",
    "Pager",
    "Session",
    "maybe_one_fd",
    "take_one_fd",
    "undo_for",
]

MAX_REPLY = 256 << 10  # above any SOCK_SEQPACKET packet the kernel lets the broker send
MAX_REPLY_FDS = 1 + 2 * p.MAX_FENCE_TIMELINES  # a fence, and a page and an eventfd per timeline


class Session:
    """One connection's protocol state, sans I/O."""

    def __init__(self, name: str, constraints: Constraints | None) -> None:
        self.name = name
        self.constraints = constraints or Constraints()
        self._ids = itertools.count(1)
        self.device_id: int | None = None
        self.broker_version: str | None = None
        self.shutting_down = False

    def request(self, args: p.OpArgs) -> tuple[int, bytes]:
        id = next(self._ids)
        return id, p.encode_request(id, args)

    def hello_args(self) -> p.Hello:
        return p.Hello(version=p.PROTOCOL_VERSION, name=self.name, constraints=self.constraints)

    def welcome(self, result: dict[str, Any]) -> None:
        self.device_id = result["device"]
        self.broker_version = result.get("broker")

    def receive(self, data: bytes | memoryview, fds: list[int]) -> p.Message | None:
        """Decode one packet; None for end of file. Events are noted here."""
        if not data and not fds:
            return None
        try:
            message = p.decode(data, fds)
        except BrokerError:
            p.close_all(fds)
            raise
        self._note(message)
        return message

    def answer(self, id: int, data: bytes | memoryview, fds: list[int]) -> tuple[Any, list[int]] | None:
        """What request ``id`` got, if this packet (not end of file) answers it.

        Its result and descriptors, or the exception its error stands for, raised; None for
        any other packet (an event, a reply to an abandoned request), whose descriptors are
        closed. The blocking client's per-call path: see ``p.decode_answer``.
        """
        try:
            result, message = p.decode_answer(data, fds, id)
        except BrokerError:
            p.close_all(fds)
            raise
        if message is None:
            return result, fds
        if isinstance(message, p.Event):
            self._note(message)  # which closes its descriptors
            return None
        if isinstance(message, p.Reply | p.Error) and message.id in (id, None):
            return self.outcome(message)
        p.close_all(message.fds)
        return None

    def _note(self, message: p.Message) -> None:
        if isinstance(message, p.Event):
            p.close_all(message.fds)
            if message.name == "shutdown":
                self.shutting_down = True

    @staticmethod
    def outcome(message: p.Reply | p.Error) -> tuple[Any, list[int]]:
        """The result and descriptors of a reply, or the exception an error stands for."""
        if isinstance(message, p.Error):
            p.close_all(message.fds)
            raise message.exception()
        return message.result, list(message.fds)

    @staticmethod
    def lost(error: OSError | None = None) -> BrokerError:
        reason = f": {error.strerror}" if error is not None and error.strerror else ""
        return BrokerError(errno.ECONNRESET, f"the broker closed the connection{reason}")


def exportable(memfd: int) -> None:
    """Take group and other write permission off ``memfd``, and seal it against growing,
    before it is exported.

    A process of another uid that gets a read-only descriptor of the buffer could otherwise
    reopen it for writing through /proc/self/fd. The broker makes the memfd mode 0400 where it
    may (as root); a broker that is not root refuses a memfd that others may write (EACCES).
    The owner's own access is unchanged. If this process does not own it, the broker decides.
    """
    try:
        if not os.readlink(f"/proc/self/fd/{memfd}").startswith("/memfd:"):
            return  # not a memfd: the broker refuses it, and nothing here should change a file
    except OSError:
        return
    mode = os.fstat(memfd).st_mode & 0o7777
    if mode & 0o022:
        with contextlib.suppress(PermissionError):
            os.fchmod(memfd, mode & ~0o022)
    # The broker requires F_SEAL_GROW, so that the size it charged is the size for good: add it
    # (an exported memfd never grows anyway); one sealed F_SEAL_SEAL stays as it is.
    with contextlib.suppress(OSError):
        if not fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL:
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)


def take_one_fd(fds: list[int]) -> int:
    if not fds:
        raise p.ProtocolError("the broker's reply lacks its descriptor")
    p.close_all(fds[1:])
    return fds[0]


def maybe_one_fd(fds: list[int]) -> int | None:
    """The handle a buffer reply may carry (allocate and open do, import does not)."""
    return take_one_fd(fds) if fds else None


_Listing = type[p.Buffers] | type[p.Devices] | type[p.Timelines] | type[p.Streams]


class Pager:
    """Reads a paged listing (``buffers``, ``devices``): ask, take, ask again while ``more``."""

    def __init__(self, op: _Listing, key: str) -> None:
        self._op = op
        self._key = key
        self.entries: list[dict[str, Any]] = []

    def request(self) -> p.OpArgs:
        return self._op(after=self.entries[-1]["id"] if self.entries else 0)

    def take(self, page: dict[str, Any]) -> bool:
        """Adds a page; True while there are more to ask for."""
        self.entries.extend(page[self._key])
        return bool(page["more"])


class ClosedWithDevice(Protocol):
    """A stream's publisher or subscriber: its local side goes when the device closes."""

    def _close_local(self) -> None: ...


class DeviceBase:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._buffers: set[BufferBase] = set()
        self._memory: set[MappedMemory] = set()
        self._views = Views()
        self._syncs: set[TimelineBase | FenceBase | ClosedWithDevice] = set()  # closed with the device
        self.closed = False

    @property
    def id(self) -> int:
        assert self._session.device_id is not None
        return self._session.device_id

    @property
    def name(self) -> str:
        return self._session.name

    @property
    def constraints(self) -> Constraints:
        return self._session.constraints

    def _check_open(self) -> None:
        if self.closed:
            raise BrokerError(errno.EBADF, "the device is closed")

    def _map_memory(self, result: dict[str, Any], fds: list[int]) -> MappedMemory:
        memory = MappedMemory(fds, segments_from_wire(result["segments"]), result["size"], result["writable"])
        self._memory.add(memory)
        return memory

    def _unmap_memory(self, memory: MappedMemory) -> bool:
        """Unmap locally; True if the broker must be told (it was mapped and we are connected).

        Raises BrokerError(EBUSY), changing nothing, while views of the memory are alive.
        """
        if memory.closed:
            return False
        memory.close()
        self._memory.discard(memory)
        return not self.closed

    def _forget_local(self) -> None:
        """Drop local resources at close; the broker drops its side when the connection ends."""
        self.closed = True
        for memory in self._memory:
            with contextlib.suppress(BrokerError):  # views still alive keep their mmap
                memory.close()
        self._memory.clear()
        for buffer in self._buffers:
            buffer._close_handle()
        self._buffers.clear()
        for obj in list(self._syncs):
            if isinstance(obj, FenceBase):
                obj.close_local()
            else:
                obj._close_local()
        self._syncs.clear()
        self._views.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"device {self._session.device_id}"
        return f"<{type(self).__name__} {self.name!r} {state}>"


class BufferBase:
    """A buffer this device holds; ``handle`` is its own handle fd, if the broker minted one."""

    def __init__(self, device: DeviceBase, result: dict[str, Any], handle: int | None) -> None:
        self._device = device
        self.id: int = result["id"]
        self.size: int = result["size"]
        self.name: str | None = result["name"]
        self.heap: str = result["heap"]
        self.exporter: str = result["exporter"]
        self.readonly: bool = result["readonly"]
        self.handle = handle
        self.closed = False
        device._buffers.add(self)

    def _close_handle(self) -> None:
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None

    def _released(self) -> None:
        self.closed = True
        self._close_handle()
        self._device._buffers.discard(self)

    def __repr__(self) -> str:
        return f"<Buffer {self.id} {self.name!r} {self.size} bytes{' read-only' if self.readonly else ''}>"


class AttachmentBase:
    def __init__(self, buffer: BufferBase, id: int) -> None:
        self.buffer = buffer
        self.id = id
        self.detached = False

    def __repr__(self) -> str:
        return f"<Attachment {self.id} to buffer {self.buffer.id}>"


class MappingBase:
    """A mapped attachment: the scatter list and the memory it describes."""

    def __init__(self, attachment: AttachmentBase, direction: Direction, memory: MappedMemory) -> None:
        self.attachment = attachment
        self.direction = direction
        self._memory = memory

    @property
    def segments(self) -> list[Segment]:
        return self._memory.segments

    @property
    def memory(self) -> memoryview:
        """The whole buffer; read-only unless the direction lets the device write."""
        if self._memory.closed:
            raise BrokerError(errno.EINVAL, "the mapping was unmapped")
        return self._memory.memory

    @property
    def unmapped(self) -> bool:
        return self._memory.closed

    def __repr__(self) -> str:
        return f"<Mapping of attachment {self.attachment.id} {self.direction.value}>"


class CpuAccessBase:
    """``with buffer.cpu_access(mode) as memory``: begin on enter, end on exit."""

    def __init__(self, buffer: BufferBase, access: Access, timeout: float | None = None) -> None:
        self.buffer = buffer
        self.access = access
        self.timeout = timeout  # for the buffer's fences (ETIME); None: as long as they take
        self._memory: MappedMemory | None = None

    @property
    def memory(self) -> memoryview:
        if self._memory is None or self._memory.closed:
            raise BrokerError(errno.EINVAL, "cpu access has not begun or has ended")
        return self._memory.memory


def undo_for(args: p.OpArgs, result: Any) -> p.OpArgs | None:
    """The request that takes back what ``args`` did, for a reply nobody waits for any more.

    A trio task cancelled while its request is in flight must not leak the broker-side state
    the request created; the reply's descriptors are closed by the caller.
    """
    match args:
        case p.Allocate() | p.Open() | p.Import() | p.ExportMemfd():
            return p.Release(buffer=result["id"])
        case p.Attach():
            return p.Detach(attachment=result["attachment"])
        case p.Map(attachment=att):
            return p.Unmap(attachment=att)
        case p.CpuBegin(buffer=buffer, access=access):
            return p.CpuEnd(buffer=buffer, access=access)
        case p.MakeTimeline() | p.ImportTimeline():
            return p.ReleaseTimeline(timeline=result["id"])
    return None
