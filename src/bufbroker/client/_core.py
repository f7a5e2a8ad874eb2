"""What the blocking and trio clients share: every decision that needs no I/O.

``Session`` numbers requests, encodes them, decodes what comes back and turns errors into
exceptions. The ``*Base`` classes hold the objects' data and local resources (handle fds,
mmaps); the blocking and trio modules add only the methods that talk to the broker, with the
same names in the same order (like httpx's Client and AsyncClient).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import math
import os

from .. import protocol as p
from ..protocol import Access, BrokerError, BrokerUnavailable, Constraints, Direction, Segment
from ._memory import MappedMemory, segments_from_wire
from ._timeline import FenceBase, TimelineBase, Views

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any, Protocol

    class ClosedWithDevice(Protocol):
        """A stream's publisher or subscriber: its local side goes when the device closes."""

        def _close_local(self) -> None: ...

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_REPLY",
    "MAX_REPLY_FDS",
    "AttachmentBase",
    "BufferBase",
    "CpuAccessBase",
    "DeviceBase",
    "MappingBase",
    "Pager",
    "Session",
    "connect_error",
    "maybe_one_fd",
    "take_one_fd",
    "teardown_for",
    "unclosed",
    "undo_for",
]

MAX_REPLY = 256 << 10  # above any SOCK_SEQPACKET packet the kernel lets the broker send
MAX_REPLY_FDS = p.MAX_REPLY_FDS
DEFAULT_TIMEOUT = 10.0  # seconds a call waits for the broker's answer, unless told otherwise
MOVE_WAIT = 60.0  # above any exporter_call_timeout: what a move without a timeout may take
# What a cpu access without a timeout may wait for its buffer's fences, beyond the call's own
# limit: the broker's default max_fence_time, which bounds every promised point.
FENCE_ALLOWANCE = 10.0


def connect_error(path: str, error: OSError, *, default: bool) -> BrokerError:
    """What a failed connect to ``path`` means, in words that name the path.

    ``default``: the path came from the environment or the default rule, not from the caller,
    so the hint may mention how to choose another.
    """
    match error.errno:
        case errno.ENOENT | errno.ECONNREFUSED:
            if os.path.isdir(path):
                return BrokerError(errno.ENOTSOCK, f"{path} is a directory, not the broker's socket")
            return BrokerUnavailable(path, error.errno, default=default)
        case errno.EPROTOTYPE:
            return BrokerError(
                errno.EPROTOTYPE, f"{path} is not a bufbroker socket (it is not of type SOCK_SEQPACKET)"
            )
        case errno.EAGAIN:  # SO_SNDTIMEO ran out while the listener's queue stayed full
            return BrokerError(
                errno.ETIMEDOUT, f"the broker at {path} accepts no connection (it may be stopped)"
            )
    return BrokerError(error.errno or errno.EIO, f"cannot connect to {path}: {error.strerror or error}")


_NAMED = frozenset(cls for cls in p.OP_NAMES if "name" in cls._fields)  # ops that carry a name


class Session:
    """One connection's protocol state, sans I/O."""

    def __init__(
        self,
        name: str,
        constraints: Constraints | None,
        path: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        exporter: bool = False,
    ) -> None:
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise BrokerError(
                errno.EINVAL, f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        self.name = name
        self.constraints = constraints or Constraints()
        self.exporter = exporter
        self.revoked: set[int] = set()  # buffers whose exporter revoked them (the "revoked" event)
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.device_id: int | None = None
        self.broker_version: str | None = None
        self.shutting_down = False
        # The blocking client's bookkeeping of requests in flight (the trio client keeps its own
        # in its reader): ids whose caller waits, replies that came for another thread's id,
        # ids nobody waits for any more, and the requests that undo what those created.
        self.waiting: set[int] = set()
        self.parked: dict[int, p.Reply | p.Error] = {}
        self.abandoned: dict[int, p.OpArgs | None] = {}
        self.undo: list[p.OpArgs] = []

    def request(self, args: p.OpArgs) -> tuple[int, bytes]:
        """A new id and the request's packet; a request the broker must refuse is refused here.

        Names are checked locally because an oversized one would not even reach the broker
        whole; encoding errors (an int beyond 64 bits) are the caller's, not the connection's.
        """
        if type(args) in _NAMED:
            name = args.name  # type: ignore[attr-defined]
            if name is not None and (type(name) is not str or len(name.encode()) > p.MAX_NAME_BYTES):
                op = p.OP_NAMES[type(args)]
                raise BrokerError(
                    errno.EINVAL, f"{op}: name must be at most {p.MAX_NAME_BYTES} bytes of UTF-8"
                )
        id = next(self._ids)
        try:
            return id, p.encode_request(id, args)
        except (OverflowError, TypeError, ValueError) as e:
            raise BrokerError(errno.EINVAL, f"{p.OP_NAMES[type(args)]}: {e}") from None

    def wait_limit(self, args: p.OpArgs, timeout: float | None = None) -> float | None:
        """How long a call may wait for its answer: ``timeout``, else the device's, plus the
        time the broker itself was asked to wait (``open``'s and ``cpu_begin``'s timeout); None
        for ever."""
        limit = self.timeout if timeout is None else timeout
        if limit is not None and type(args) is p.Open and args.timeout:
            limit += args.timeout
        elif limit is not None and type(args) is p.Move:  # the broker waits for importers
            limit += MOVE_WAIT if args.timeout is None else args.timeout
        elif limit is not None and type(args) is p.CpuBegin:  # waits on the buffer's fences first
            limit += FENCE_ALLOWANCE if args.timeout is None else args.timeout
        return limit

    def timed_out(self, args: p.OpArgs, limit: float) -> BrokerError:
        return BrokerError(
            errno.ETIMEDOUT,
            f"{p.OP_NAMES[type(args)]}: no answer from the broker at {self.path} within {limit:g} s "
            "(is it stopped or overloaded?)",
        )

    @staticmethod
    def explain(args: p.OpArgs, error: BrokerError) -> BrokerError:
        """The broker's error, said with what the call did (an ``open`` that waited says so)."""
        if type(args) is p.Open and args.timeout and error.errno == errno.ENOENT:
            return BrokerError(
                errno.ENOENT, f"no buffer named {args.name!r} appeared within {args.timeout:g} s"
            )
        return error

    def sent_fds_error(self, args: p.OpArgs, error: OSError) -> BrokerError | None:
        """A send that failed for a reason of the caller's (a bad descriptor, a packet too
        big), as its error; None if it means the connection is gone."""
        op = p.OP_NAMES[type(args)]
        match error.errno:
            case errno.EBADF:
                return BrokerError(errno.EBADF, f"{op}: not an open file descriptor")
            case errno.EMSGSIZE:
                return BrokerError(errno.EMSGSIZE, f"{op}: the request is too large to send")
            case errno.EINVAL | errno.ETOOMANYREFS:
                return BrokerError(error.errno, f"{op}: the descriptors cannot be sent ({error.strerror})")
        return None

    def hello_args(self) -> p.Hello:
        return p.Hello(
            version=p.PROTOCOL_VERSION, name=self.name, constraints=self.constraints, exporter=self.exporter
        )

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
        if isinstance(message, p.Reply | p.Error) and message.id in self.waiting:
            self.parked[message.id] = message  # another thread's: it takes it from here
            return None
        p.close_all(message.fds)
        if isinstance(message, p.Reply | p.Error) and message.id in self.abandoned:
            self.settle_abandoned(message.id, message)
        return None

    def route(self, data: bytes | memoryview, fds: list[int]) -> p.Call | p.Event | None:
        """For a thread that reads the socket for everyone (an exporter's, see ``_threads``):
        park a reply for the thread waiting for it (or settle an abandoned one) and return
        None; return a call or event for the reader to serve. End of file is an error."""
        message = self.receive(data, fds)
        if message is None:
            raise self.lost()
        if isinstance(message, p.Call | p.Event):
            return message
        if isinstance(message, p.Reply | p.Error):
            if message.id is None:  # the broker blames no request: it is about to hang up
                p.close_all(message.fds)
                raise message.exception()
            if message.id in self.waiting:
                self.parked[message.id] = message
                return None
            if message.id in self.abandoned:
                p.close_all(message.fds)
                self.settle_abandoned(message.id, message)
                return None
        p.close_all(message.fds)
        return None

    def abandon(self, id: int, args: p.OpArgs) -> None:
        """Nobody waits for request ``id`` any more (a timeout, Ctrl-C): what its reply created
        is undone when it comes (``undo``), so the broker holds only what objects stand for."""
        self.waiting.discard(id)
        late = self.parked.pop(id, None)
        if late is None:
            self.abandoned[id] = args
            return
        p.close_all(late.fds)
        self.abandoned[id] = args
        self.settle_abandoned(id, late)

    def settle_abandoned(self, id: int, message: p.Reply | p.Error) -> None:
        args = self.abandoned.pop(id)
        if args is not None and isinstance(message, p.Reply):
            undo = undo_for(args, message.result)
            if undo is not None:
                self.undo.append(undo)

    def _note(self, message: p.Message) -> None:
        if isinstance(message, p.Event):
            p.close_all(message.fds)
            if message.name == "shutdown":
                self.shutting_down = True
            elif message.name == "revoked" and type(buffer := message.args.get("buffer")) is int:
                self.revoked.add(buffer)

    @staticmethod
    def outcome(message: p.Reply | p.Error) -> tuple[Any, list[int]]:
        """The result and descriptors of a reply, or the exception an error stands for."""
        if isinstance(message, p.Error):
            p.close_all(message.fds)
            raise message.exception()
        return message.result, list(message.fds)

    def lost(self, error: OSError | None = None) -> BrokerError:
        reason = f": {error.strerror}" if error is not None and error.strerror else ""
        at = f" at {self.path}" if self.path else ""
        return BrokerError(errno.ECONNRESET, f"the broker{at} closed the connection{reason}")


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
        try:  # noqa: SIM105 (contextlib costs the CLI start-up time)
            os.fchmod(memfd, mode & ~0o022)
        except PermissionError:
            pass
    # The broker requires F_SEAL_GROW, so that the size it charged is the size for good: add it
    # (an exported memfd never grows anyway); one sealed F_SEAL_SEAL stays as it is.
    try:
        if not fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL:
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    except OSError:
        pass


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
        memory = MappedMemory(
            fds,
            segments_from_wire(result["segments"]),
            result["size"],
            result["writable"],
            result.get("span"),
        )
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
            try:
                memory.close()
            except BrokerError:  # views still alive keep the memory mapped until they go
                memory.abandon()
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
        self.sealable: bool = result.get("sealable", False)
        self.sealed: bool = result.get("sealed", False)
        self.immutable: bool = result.get("immutable", False)  # as of the last reply about it
        self.handle = handle
        self.closed = False
        self.mapping: MappingBase | None = None  # made with the buffer (``map=``), if asked
        device._buffers.add(self)
        if result.get("revoked"):  # already, when this device got it
            device._session.revoked.add(self.id)

    def _close_handle(self) -> None:
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None

    def _released(self) -> None:
        self.closed = True
        self._close_handle()
        self._device._buffers.discard(self)

    def _sealed(self, result: dict[str, Any]) -> None:
        self.sealed, self.immutable = result["sealed"], result["immutable"]

    @property
    def revoked(self) -> bool:
        """Whether its exporter revoked it (as far as events received so far say)."""
        return self.id in self._device._session.revoked

    def __repr__(self) -> str:
        state = " read-only" if self.readonly else ""
        state += " immutable" if self.immutable else " sealed" if self.sealed else ""
        return f"<Buffer {self.id} {self.name!r} {self.size} bytes{state}>"


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
        """The whole buffer; read-only unless the direction lets the device write.

        A new view each time: while it or anything made from it is alive, ``unmap`` refuses
        with EBUSY.
        """
        return self._memory.view()

    def asarray(
        self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None, *, offset: int = 0
    ) -> Any:
        """A numpy array over the mapping's memory (no copy), read-only where the memory is.

        ``shape`` defaults to all the elements that fit; the array keeps ``unmap`` refusing
        with EBUSY while it (or a view of it) is alive. numpy is imported here, on first use
        (``pip install bufbroker[numpy]``).
        """
        import numpy

        dt = numpy.dtype(dtype)
        dims = (shape,) if isinstance(shape, int) else shape
        count = -1 if dims is None else math.prod(dims)
        # Checked before any view exists: a traceback would keep the view, and the memory
        # mapped, for as long as the exception is kept.
        size = self._memory.size
        available = (size - offset) // dt.itemsize if 0 <= offset <= size else -1
        if count > available or available < 0:
            raise BrokerError(
                errno.EINVAL, f"{dims} of {dt} at offset {offset} does not fit in {size} bytes of memory"
            )
        memory = self._memory.view()
        array = numpy.frombuffer(memory, dtype=dt, count=available if count < 0 else count, offset=offset)
        return array if dims is None else array.reshape(dims)

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack export of the memory as bytes (uint8), through numpy: ``torch.from_dlpack(m)``."""
        return self.asarray().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0

    def fds(self) -> list[int]:
        """New descriptors of the backing (``segments`` index them), the caller's to close.

        Read-only where the mapping is: the kernel refuses a writable mmap of them. For APIs
        that take a descriptor (V4L2 DMABUF import needs a real dma-buf; EGL and Vulkan take
        memfd-backed memory as host pointers or via their fd import paths).
        """
        return self._memory.dup_fds()

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
        """A new view of the buffer; ``end`` refuses with EBUSY while it is alive."""
        if self._memory is None or self._memory.closed:
            raise BrokerError(errno.EINVAL, "cpu access has not begun or has ended")
        return self._memory.view()

    def _check_begun(self) -> MappedMemory | None:
        """The memory to end; EINVAL if ``begin`` never was; None if it has ended already."""
        if self._memory is None:
            raise BrokerError(errno.EINVAL, "cpu access has not begun: end() without begin()")
        return None if self._memory.closed else self._memory


def unclosed(error: BaseException | None, failure: BrokerError) -> None:
    """A ``with`` block ended by ``error`` could not close its object: ``failure`` becomes a
    note on ``error`` (which goes on) rather than hide it; without an error, it is raised."""
    if error is None:
        raise failure
    error.add_note(f"bufbroker: could not close on the way out: {failure.strerror}")


def teardown_for(buffer_ref: int | p.Ref, attachment_ref: int | p.Ref | None) -> list[p.OpArgs]:
    """What gives back a buffer mapped with it: unmap, detach, release, in that order (each
    answered with an error, and harmless, where there is nothing to give back)."""
    release: list[p.OpArgs] = [p.Release(buffer=buffer_ref)]
    if attachment_ref is None:
        return release
    return [p.Unmap(attachment=attachment_ref), p.Detach(attachment=attachment_ref), *release]


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
