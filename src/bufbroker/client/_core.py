"""What the blocking and trio clients share: every decision that needs no I/O.

The ``*Base`` classes hold the objects' data and local resources (handle fds, mmaps); the
blocking and trio modules add only the methods that talk to the broker, with the same names in
the same order (like httpx's Client and AsyncClient). ``Session`` (``_session``), re-exported
here, keeps a connection's requests and replies.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os

from .. import protocol as p
from ..protocol import Access, BrokerError, Constraints, Direction, Segment
from ._memory import MappedMemory, segments_from_wire
from ._session import (
    DEFAULT_TIMEOUT,
    MAX_REPLY,
    MAX_REPLY_FDS,
    Session,
    connect_error,
    teardown_for,
    undo_for,
)
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
