"""The blocking client: plain stdlib sockets, one request in flight at a time per device.

Importing this module never imports trio (which costs ~140 ms of start-up): the CLI and
short-lived scripts depend on that.
"""

from __future__ import annotations

import mmap
import os
import socket as _socket
import threading
from collections.abc import Sequence
from typing import Any, Self

from .. import protocol as p
from .._paths import default_socket_path
from ..protocol import Access, BrokerUnavailable, Constraints, Direction
from ._core import (
    MAX_REPLY,
    MAX_REPLY_FDS,
    AttachmentBase,
    BufferBase,
    CpuAccessBase,
    DeviceBase,
    MappingBase,
    Pager,
    Session,
    exportable,
    maybe_one_fd,
    take_one_fd,
)
from ._sync_stream import Frame, Loan, Publisher, Subscriber
from ._sync_timeline import Fence, Timeline

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

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


def connect(name: str, *, constraints: Constraints | None = None, socket: str | None = None) -> Device:
    """Register this process as a device named ``name`` with the broker at ``socket``."""
    path = socket or default_socket_path()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise BrokerUnavailable(path, e.errno or 0) from None
    except BaseException:
        sock.close()
        raise
    device = Device(sock, Session(name, constraints))
    try:
        result, _ = device._call(device._session.hello_args())
        device._session.welcome(result)
    except BaseException:
        device.close()
        raise
    return device


class Device(DeviceBase, _Closing):
    """This process as a device: it exports, imports, attaches and maps buffers."""

    def __init__(self, sock: _socket.socket, session: Session) -> None:
        super().__init__(session)
        self._sock = sock
        self._lock = threading.Lock()
        self._ancbuf = p.ancillary_space(MAX_REPLY_FDS)
        # One receive buffer for the device's life (a fresh 256 KiB per reply would cost an
        # mmap/munmap pair in malloc on every round trip), of anonymous memory so that only the
        # pages replies touch are resident.
        self._inbox = mmap.mmap(-1, MAX_REPLY)

    def _receive(self, reset: OSError | None, with_fds: bool) -> tuple[memoryview, list[int]]:
        """The next packet and its descriptors.

        Without ``with_fds`` (a reply that carries none; events and errors never do) a plain
        receive does, a little cheaper; descriptors sent all the same would be closed by the
        kernel, having nowhere to go.
        """
        ancdata: list[tuple[int, int, bytes]] = []
        flags = 0
        while True:
            try:
                if with_fds:
                    n, ancdata, flags, _ = self._sock.recvmsg_into([self._inbox], self._ancbuf, p.RECV_FLAGS)
                else:
                    n = self._sock.recv_into(self._inbox)
                break
            except ConnectionResetError as e:
                # The broker hung up with requests of ours unread. The kernel reports that
                # once, before the packets the broker had sent, which may say why (an error
                # with no id, e.g. a connection limit): read on to the end.
                if reset is not None:
                    raise self._session.lost(e) from None
                reset = e
            except OSError as e:
                raise self._session.lost(e) from None
        fds = p.fds_from_ancillary(ancdata, flags, MAX_REPLY_FDS) if ancdata or flags else []
        if not n and not fds:
            raise self._session.lost(reset)
        return memoryview(self._inbox)[:n], fds

    def _call(self, args: p.OpArgs, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        """One request: its result and the descriptors its reply carried (the caller's now)."""
        self._check_open()
        session = self._session
        with self._lock:
            id, data = session.request(args)
            reset: OSError | None = None
            try:
                if fds:
                    self._sock.sendmsg([data], p.ancillary(fds))
                else:
                    self._sock.send(data)
            except (BrokenPipeError, ConnectionResetError) as e:
                reset = e  # the broker hung up; what it sent before may say why
            except OSError as e:
                raise session.lost(e) from None
            with_fds = args.reply_fds
            while True:
                answer = session.answer(id, *self._receive(reset, with_fds))
                if answer is not None:
                    return answer

    def _buffer(self, args: p.OpArgs, fds: Sequence[int] = ()) -> Buffer:
        result, got = self._call(args, fds)
        return Buffer(self, result, maybe_one_fd(got))

    def ping(self) -> None:
        """A request that does nothing: measures a round trip, proves the broker is alive."""
        self._call(_PING)

    def allocate(self, size: int, *, name: str | None = None, heap: str = "memfd") -> Buffer:
        """A new buffer of ``size`` bytes (rounded up to pages); its memory comes at first map."""
        return self._buffer(p.Allocate(size=size, name=name, heap=heap))

    def import_handle(self, fd: int) -> Buffer:
        """The buffer behind handle ``fd``; the caller keeps (and should close) ``fd``."""
        return self._buffer(p.Import(), [fd])

    def open(self, name: str, *, timeout: float | None = None, uid: int | None = None) -> Buffer:
        """The buffer this uid named ``name``; waits up to ``timeout`` s for it to appear.

        Each uid has names of its own; root opens another uid's by saying whose (``uid``).
        """
        return self._buffer(p.Open(name=name, timeout=timeout, uid=uid))

    def export_memfd(self, memfd: int, *, name: str | None = None) -> Buffer:
        """A buffer over this process's own sealed memfd, without a copy (udmabuf).

        Takes group and other write permission off the memfd's mode (see docs/CLIENT.md).
        """
        exportable(memfd)
        return self._buffer(p.ExportMemfd(name=name), [memfd])

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
            self._sock.close()


class Buffer(BufferBase, _Closing):
    _device: Device

    def share(self, *, readonly: bool = False) -> int:
        """A new handle fd for this buffer, owned by the caller; read-only if asked."""
        return take_one_fd(self._device._call(p.Share(buffer=self.id, readonly=readonly))[1])

    def set_name(self, name: str | None) -> None:
        """Name (or, with None, unname) the buffer: at most 31 bytes of UTF-8."""
        self._device._call(p.SetName(buffer=self.id, name=name))
        self.name = name or None

    def attach(self) -> Attachment:
        """Link this device to the buffer with its constraints (EINVAL/EBUSY if they cannot be met)."""
        result, _ = self._device._call(p.Attach(buffer=self.id))
        return Attachment(self, result["attachment"])

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
        """Release this device's hold (EBUSY while attached) and close its own handle."""
        if not self.closed and not self._device.closed:
            self._device._call(p.Release(buffer=self.id))
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
        if not self.detached and not self.buffer._device.closed:
            self.buffer._device._call(p.Detach(attachment=self.id))
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
        return self._memory.memory

    def end(self) -> None:
        """End the access (EBUSY, changing nothing, while views of the memory are alive)."""
        device = self.buffer._device
        if self._memory is not None and device._unmap_memory(self._memory):
            device._call(p.CpuEnd(buffer=self.buffer.id, access=self.access))

    def __enter__(self) -> memoryview:
        return self.begin()

    def __exit__(self, *exc: Any) -> None:
        self.end()
