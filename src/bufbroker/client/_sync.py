"""The blocking client: plain stdlib sockets, one request in flight at a time per device.

Importing this module never imports trio (which costs ~140 ms of start-up): the CLI and
short-lived scripts depend on that.
"""

from __future__ import annotations

import _socket  # the C module: socket.py costs start-up time
import os
from collections.abc import Sequence

from .. import protocol as p
from .._paths import default_socket_path
from ..protocol import Access, BrokerError, Constraints, Direction
from ._core import (
    DEFAULT_TIMEOUT,
    AttachmentBase,
    BufferBase,
    CpuAccessBase,
    MappingBase,
    Pager,
    Session,
    connect_error,
    exportable,
    maybe_one_fd,
    take_one_fd,
    teardown_for,
    unclosed,
)
from ._sync_link import Link, timeval
from ._sync_stream import Frame, Loan, Publisher, Subscriber
from ._sync_timeline import Fence, Timeline

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Self

    from ._exporting import Exporter

__all__ = [
    "Attachment",
    "Buffer",
    "CpuAccess",
    "Device",
    "Fence",
    "Frame",
    "Loan",
    "Mapping",
    "Publisher",
    "Subscriber",
    "Timeline",
    "connect",
]

_PING = p.Ping()  # records are immutable: one does for every call


class _Closing:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            self.close()
        except BrokerError as failure:
            unclosed(error, failure)

    def close(self) -> None:
        raise NotImplementedError


def connect(
    name: str,
    *,
    constraints: Constraints | None = None,
    socket: str | os.PathLike[str] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    exporter: Exporter | None = None,
) -> Device:
    """Register this process as a device named ``name`` with the broker at ``socket``.

    ``timeout`` (seconds, or None for ever) bounds the connection and every call's wait for
    the broker's answer: a stopped or hung broker gives BrokerError(ETIMEDOUT) naming the
    socket. ``open``'s own ``timeout`` is added to it for that call. With ``exporter``, the
    device may ``export`` buffers whose memory and ops ``exporter`` supplies; it answers
    their calls on a thread of its own (see ``Exporter``).
    """
    path = default_socket_path() if socket is None else os.fspath(socket)
    session = Session(name, constraints, path, timeout, exporter=exporter is not None)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        # Kernel-side limits cost no system call per request: SO_RCVTIMEO bounds each receive,
        # SO_SNDTIMEO each send and connect()'s wait for room in a listener's full queue.
        limit = timeval(timeout)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, limit)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, limit)
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise connect_error(path, e, default=socket is None) from None
    except BaseException:
        sock.close()
        raise
    device = Device(sock, session)
    try:
        result, _ = device._call(device._session.hello_args())
        device._session.welcome(result)
        if exporter is not None:
            from ._exporting import CallServer

            device._serve_in_threads(CallServer(exporter))
    except BaseException:
        device.close()
        raise
    return device


class Device(Link, _Closing):
    """This process as a device: it exports, imports, attaches and maps buffers.

    Threads may share a device: each sends its request whole, and whichever waits reads the
    socket for all, handing each reply to the thread whose id it bears, so one thread's long
    ``open`` does not hold up the others.
    """

    def _buffer(self, args: p.OpArgs, fds: Sequence[int] = (), map: Direction | None = None) -> Buffer:
        """The buffer ``args`` makes; with ``map``, attached and mapped in the same round trip."""
        if map is None:
            result, got = self._call(args, fds)
            return Buffer(self, result, maybe_one_fd(got))
        (result, got), (attached, _), (mapped, backing) = self._chain(args, fds, map)
        buffer = Buffer(self, result, maybe_one_fd(got))
        attachment = Attachment(buffer, attached["attachment"])
        buffer.mapping = Mapping(attachment, map, self._map_memory(mapped, backing))
        return buffer

    def ping(self) -> None:
        """A request that does nothing: measures a round trip, proves the broker is alive."""
        self._call(_PING)

    def allocate(
        self,
        size: int,
        *,
        name: str | None = None,
        heap: str = "memfd",
        sealable: bool = False,
        map: Direction | None = None,
    ) -> Buffer:
        """A new buffer of ``size`` bytes (its backing: whole pages of ``heap``); its memory
        comes at first map. ``sealable``: it can be sealed (``seal``).

        With ``map``, the buffer comes attached and mapped for that direction (``.mapping``),
        in one round trip; closing it unmaps, detaches and releases it without waiting.
        """
        return self._buffer(p.Allocate(size=size, name=name, heap=heap, sealable=sealable), map=map)

    def import_handle(self, fd: int, *, map: Direction | None = None) -> Buffer:
        """The buffer behind handle ``fd``; the caller keeps (and should close) ``fd``.

        With ``map``, attached and mapped too, in one round trip (see ``allocate``).
        """
        return self._buffer(p.Import(), [fd], map=map)

    def open(
        self,
        name: str,
        *,
        timeout: float | None = None,
        sealed: bool = False,
        uid: int | None = None,
        map: Direction | None = None,
    ) -> Buffer:
        """The buffer this uid named ``name``; waits up to ``timeout`` s for it to appear.

        Each uid has names of its own; root opens another uid's by saying whose (``uid``).
        With ``sealed``, only once it is sealed (Plasma's get): EAGAIN if it is not by then.
        Interrupted (Ctrl-C) or timed out while waiting, the open is undone when its late
        reply comes, so the device holds nothing without an object. With ``map``, attached
        and mapped too, in one round trip (see ``allocate``).
        """
        return self._buffer(p.Open(name=name, timeout=timeout, sealed=sealed, uid=uid), map=map)

    def export_memfd(self, memfd: int, *, name: str | None = None) -> Buffer:
        """A buffer over this process's own sealed memfd, without a copy (udmabuf).

        Takes group and other write permission off the memfd's mode (see docs/CLIENT.md).
        """
        exportable(memfd)
        return self._buffer(p.ExportMemfd(name=name), [memfd])

    def export(self, size: int, *, name: str | None = None) -> Buffer:
        """A buffer whose memory and ops this device's exporter supplies (``connect(exporter=)``)."""
        return self._buffer(p.Export(size=size, name=name))

    def _listing(self, pager: Pager) -> list[dict[str, Any]]:
        while pager.take(self._call(pager.request())[0]):
            pass
        return pager.entries

    def buffers(self) -> list[dict[str, Any]]:
        """Every buffer this uid may see (root: all), as docs/PROTOCOL.md describes."""
        return self._listing(Pager(p.Buffers, "buffers"))

    def devices(self) -> list[dict[str, Any]]:
        """Every device (connection) this uid may see (root: all)."""
        return self._listing(Pager(p.Devices, "devices"))

    def heaps(self) -> list[dict[str, Any]]:
        """Each heap: page size, whether it can allocate here, what is allocated from it."""
        result: list[dict[str, Any]] = (self._call(p.Heaps()))[0]["heaps"]
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call(p.Stats())[0]
        return result

    def timelines(self) -> list[dict[str, Any]]:
        """Every timeline this uid owns or holds (root: all)."""
        return self._listing(Pager(p.Timelines, "timelines"))

    def timeline(self, *, name: str | None = None) -> Timeline:
        """A new timeline at 0; this device is its only signaller."""
        return Timeline(self, *self._call(p.MakeTimeline(name=name)))

    def import_timeline(self, fd: int) -> Timeline:
        """The timeline behind handle ``fd``, to wait on; the caller keeps (and closes) ``fd``."""
        return Timeline(self, *self._call(p.ImportTimeline(), [fd]))

    def import_fence(self, fd: int) -> Fence:
        """The fence ``fd`` (a sync_file passed over a socket); the caller keeps ``fd``."""
        result, fds = self._call(p.ImportFence(have=self._views.have()), [fd])
        return Fence(self, os.dup(fd), result, fds)

    def merge_fences(self, first: Fence, second: Fence) -> Fence:
        """A new fence for both (SYNC_IOC_MERGE: the later point of a shared timeline)."""
        result, fds = self._call(p.MergeFences(have=self._views.have()), [first.fileno(), second.fileno()])
        return Fence(self, take_one_fd(fds[:1]), result, fds[1:])

    def streams(self) -> list[dict[str, Any]]:
        """Every stream this uid publishes (root: all), with subscribers and their lag."""
        return self._listing(Pager(p.Streams, "streams"))

    def publish(self, name: str, *, size: int, slots: int = 4) -> Publisher:
        """A stream of frames of up to ``size`` bytes through a pool of ``slots`` slots."""
        return Publisher(self, *self._call(p.Publish(name=name, size=size, slots=slots)))

    def subscribe(self, name: str, *, timeout: float | None = None) -> Subscriber:
        """Join stream ``name`` at its next frame, waiting up to ``timeout`` s for it to exist."""
        return Subscriber(self, *self._call(p.Subscribe(name=name, timeout=timeout)))

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Disconnect; the broker releases everything this device still held."""
        if not self.closed:
            self._forget_local()
            if self._served is not None:
                self._served.stop()
            self._sock.close()


class Buffer(BufferBase, _Closing):
    _device: Device

    def share(self, *, readonly: bool = False) -> int:
        """A new handle fd for this buffer, owned by the caller; read-only if asked."""
        return take_one_fd(self._device._call(p.Share(buffer=self.id, readonly=readonly))[1])

    def seal(self) -> None:
        """Seal (Plasma's seal): from now on nobody can map it writable or write it (EPERM).

        Needs ``allocate(..., sealable=True)``. Once no writable mapping of it remains
        anywhere, the kernel makes it immutable (F_SEAL_WRITE); listings say when. When this
        returns, ``open(name, sealed=True)`` finds it.
        """
        self._sealed((self._device._call(p.Seal(buffer=self.id)))[0])

    def set_name(self, name: str | None) -> None:
        """Name (or, with None, unname) the buffer: at most 31 bytes of UTF-8."""
        self._device._call(p.SetName(buffer=self.id, name=name))
        self.name = name or None

    def attach(self, *, on_move: Callable[[Attachment], Any] | None = None) -> Attachment:
        """Link this device to the buffer with its constraints (EINVAL/EBUSY if they cannot be met).

        With ``on_move``, the attachment is dynamic: when the exporter moves the buffer,
        ``on_move(attachment)`` runs (on the device's own thread) and should unmap and map
        again; without, the attachment pins the buffer where it is.
        """
        device = self._device
        if on_move is not None:
            device._serve_in_threads()
        result, _ = device._call(p.Attach(buffer=self.id, dynamic=on_move is not None))
        attachment = Attachment(self, result["attachment"])
        if on_move is not None and device._moves is not None:
            device._moves.add(attachment, on_move)
        return attachment

    def revoke(self) -> None:
        """Take an exported buffer back: importers keep their mappings, get ENODEV for new ones."""
        self._device._call(p.Revoke(buffer=self.id))

    def move(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Tell dynamic importers the memory moved; returns once none maps the old memory.

        Returns the attachments still mapping it after ``timeout`` s (the broker's
        exporter_call_timeout by default): late ones. EBUSY while a static attachment pins it.
        """
        device = self._device  # the device's limit, plus the broker's wait (Session.wait_limit)
        result, _ = device._call(p.Move(buffer=self.id, timeout=timeout), timeout=device._session.timeout)
        late: list[dict[str, Any]] = result["late"]
        return late

    def cpu_access(self, access: Access = Access.RW, *, timeout: float | None = None) -> CpuAccess:
        """``with buffer.cpu_access(Access.WRITE) as memory:`` (DMA_BUF_IOCTL_SYNC begin/end).

        Begins once the reservation's fences have signalled (READ: the writers', else all),
        waiting up to ``timeout`` s for them (ETIME).
        """
        return CpuAccess(self, access, timeout)

    def attach_fence(self, fence: Fence, access: Access) -> None:
        """Add ``fence`` to the buffer's reservation as a writer's or a reader's (IMPORT_SYNC_FILE)."""
        self._device._call(p.AttachFence(buffer=self.id, access=access), [fence.fileno()])

    def export_fence(self, access: Access) -> Fence:
        """What ``access`` must wait for, now (EXPORT_SYNC_FILE): READ the writers, else all."""
        device = self._device
        result, fds = device._call(p.ExportFence(buffer=self.id, access=access, have=device._views.have()))
        return Fence(device, take_one_fd(fds[:1]), result, fds[1:])

    def close(self) -> None:
        """Release this device's hold (EBUSY while attached) and close its own handle.

        A buffer that came mapped (``map=``) is unmapped, detached and released without
        waiting for the broker (EBUSY, changing nothing, while views of its memory are alive).
        """
        device = self._device
        if self.closed or device.closed:
            self._released()
            return
        if self.mapping is not None:
            attachment = self.mapping.attachment
            mapped = device._unmap_memory(self.mapping._memory)
            teardown = teardown_for(self.id, attachment.id)
            device._session.undo.extend(teardown if mapped else teardown[1:])
            device._send_undo()
            attachment.detached = True
        else:
            device._call(p.Release(buffer=self.id))
        self._released()


class Attachment(AttachmentBase, _Closing):
    buffer: Buffer

    def map(self, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Map for ``direction``: the scatter list, and the memory (read-only for TO_DEVICE)."""
        device = self.buffer._device
        result, fds = device._call(p.Map(attachment=self.id, direction=direction))
        return Mapping(self, direction, device._map_memory(result, fds))

    def detach(self) -> None:
        """Unlink the device (EBUSY while mapped)."""
        device = self.buffer._device
        if not self.detached and not device.closed:
            device._call(p.Detach(attachment=self.id))
        if device._moves is not None:
            device._moves.discard(self.id)
        self.detached = True

    def close(self) -> None:
        self.detach()


class Mapping(MappingBase, _Closing):
    attachment: Attachment

    def unmap(self) -> None:
        """Unmap (EBUSY, changing nothing, while views of ``memory`` are still alive)."""
        device = self.attachment.buffer._device
        if device._unmap_memory(self._memory):
            device._call(p.Unmap(attachment=self.attachment.id))

    def close(self) -> None:
        self.unmap()


class CpuAccess(CpuAccessBase):
    buffer: Buffer

    def begin(self) -> memoryview:
        device = self.buffer._device
        result, fds = device._call(
            p.CpuBegin(buffer=self.buffer.id, access=self.access, timeout=self.timeout)
        )
        self._memory = device._map_memory(result, fds)
        return self._memory.lend()

    def end(self) -> None:
        """End the access (EBUSY, changing nothing, while views of the memory are alive;
        EINVAL without ``begin``)."""
        device = self.buffer._device
        memory = self._check_begun()
        if memory is not None and device._unmap_memory(memory):
            device._call(p.CpuEnd(buffer=self.buffer.id, access=self.access))

    def __enter__(self) -> memoryview:
        return self.begin()

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            self.end()
        except BrokerError as failure:
            unclosed(error, failure)
