"""The trio client: the blocking client's twin, for programs that run under trio.

Same names, as coroutines and async context managers. The connection underneath (the reader
task, pipelining, what a cancelled call leaves behind) is ``_trio_link.Link``; this module
holds the objects and their ops, in the blocking client's order.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from socket import AF_UNIX, SOCK_CLOEXEC, SOCK_SEQPACKET  # `socket` is a parameter name here
from typing import Any

import trio

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
from ._exporting import CallServer, Exporter, MoveCallbacks
from ._trio_link import Link
from ._trio_opening import AsyncClosing as _AsyncClosing
from ._trio_opening import Opening as _Opening
from ._trio_serving import dispatch
from ._trio_stream import Frame, Loan, Publisher, Subscriber
from ._trio_timeline import Fence, Timeline

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
    "open_device",
    "recv_handle",
    "send_handle",
]

@asynccontextmanager
async def open_device(
    name: str,
    *,
    constraints: Constraints | None = None,
    socket: str | os.PathLike[str] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    exporter: Exporter | None = None,
) -> AsyncIterator[Device]:
    """``async with open_device("camera") as dev``: this program as a device named ``name``.

    Connects to the broker at ``socket`` (see ``bufbroker.connect``), registers with
    ``constraints``, and runs the task that receives replies until the block ends; on exit the
    connection closes and the broker releases whatever the device still held. Raises
    ``BrokerUnavailable`` if no broker listens there. ``timeout`` bounds the connection and
    every call's wait, as for ``bufbroker.connect``. With ``exporter``, the device may
    ``export`` buffers whose calls ``exporter`` answers, in a task of this block's nursery.
    """
    path = default_socket_path() if socket is None else os.fspath(socket)
    session = Session(name, constraints, path, timeout, exporter=exporter is not None)
    sock = trio.socket.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)
    try:
        with trio.move_on_after(DEFAULT_TIMEOUT if timeout is None else timeout) as waited:
            await sock.connect(path)
        if waited.cancelled_caught:
            raise connect_error(path, BlockingIOError(errno.EAGAIN, "timed out"), default=socket is None)
    except OSError as e:
        sock.close()
        raise (e if isinstance(e, BrokerError) else connect_error(path, e, default=socket is None)) from None
    except BaseException:
        sock.close()
        raise
    # What the block raises is raised again outside the nursery, so that callers catch it as
    # itself rather than wrapped in an ExceptionGroup. The reader does not raise: it turns
    # every failure into the error the waiting tasks get.
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            device = Device(sock, session, nursery)
            device._calls = CallServer(exporter) if exporter is not None else None
            nursery.start_soon(device._read)
            try:
                result, _ = await device._call(device._session.hello_args())
                device._session.welcome(result)
                yield device
            except BaseException as e:
                error = e
            finally:
                device._close_now()
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
    if error is not None:
        raise error


class Device(Link):
    """This process as a device, for trio programs; made by ``open_device``."""

    def __init__(self, sock: trio.socket.SocketType, session: Session, nursery: trio.Nursery) -> None:
        super().__init__(sock, session, nursery)
        self._calls: CallServer | None = None  # an exporter's
        self._moves = MoveCallbacks()
        self._jobs: trio.MemorySendChannel[p.Call | p.Event] | None = None  # see _trio_serving

    def _dispatch(self, message: p.Call | p.Event) -> None:
        if isinstance(message, p.Call) or self._moves or self._calls:
            dispatch(self, message)

    # --- the same methods as the blocking Device, in the same order

    async def _buffer(
        self, args: p.OpArgs, fds: Sequence[int] = (), map: Direction | None = None
    ) -> Buffer:
        """The buffer ``args`` makes; with ``map``, attached and mapped in the same round trip."""
        if map is None:
            result, got = await self._call(args, fds)
            return Buffer(self, result, maybe_one_fd(got))
        (result, got), (attached, _), (mapped, backing) = await self._chain(args, fds, map)
        buffer = Buffer(self, result, maybe_one_fd(got))
        attachment = Attachment(buffer, attached["attachment"])
        buffer.mapping = Mapping(attachment, map, self._map_memory(mapped, backing))
        return buffer

    async def ping(self) -> None:
        """A round trip; when it returns, the broker has applied every undo sent before.

        An undo goes out when its abandoned reply arrives, which may be while this ping is
        waiting, after the ping itself was sent: then one more round trip settles it.
        """
        while True:
            sent = self._unawaited_sent
            await self._call(p.Ping())
            if self._unawaited_sent == sent and not self._backlog:
                return

    async def allocate(
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
        return await self._buffer(p.Allocate(size=size, name=name, heap=heap, sealable=sealable), map=map)

    async def import_handle(self, fd: int, *, map: Direction | None = None) -> Buffer:
        """The buffer behind handle ``fd``; the caller keeps (and should close) ``fd``.

        With ``map``, attached and mapped too, in one round trip (see ``allocate``).
        """
        return await self._buffer(p.Import(), [fd], map=map)

    async def open(
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
        With ``map``, attached and mapped too, in one round trip (see ``allocate``).
        """
        return await self._buffer(p.Open(name=name, timeout=timeout, sealed=sealed, uid=uid), map=map)

    async def export_memfd(self, memfd: int, *, name: str | None = None) -> Buffer:
        """A buffer over this process's own sealed memfd, without a copy (udmabuf).

        Takes group and other write permission off the memfd's mode (see docs/CLIENT.md).
        """
        exportable(memfd)
        return await self._buffer(p.ExportMemfd(name=name), [memfd])

    async def export(self, size: int, *, name: str | None = None) -> Buffer:
        """A buffer whose memory and ops this device's exporter supplies (``exporter=``)."""
        return await self._buffer(p.Export(size=size, name=name))

    async def _listing(self, pager: Pager) -> list[dict[str, Any]]:
        while pager.take((await self._call(pager.request()))[0]):
            pass
        return pager.entries

    async def buffers(self) -> list[dict[str, Any]]:
        """Every buffer this uid may see (root: all), as docs/PROTOCOL.md describes."""
        return await self._listing(Pager(p.Buffers, "buffers"))

    async def devices(self) -> list[dict[str, Any]]:
        """Every device (connection) this uid may see (root: all)."""
        return await self._listing(Pager(p.Devices, "devices"))

    async def heaps(self) -> list[dict[str, Any]]:
        """Each heap: page size, whether it can allocate here, what is allocated from it."""
        result: list[dict[str, Any]] = (await self._call(p.Heaps()))[0]["heaps"]
        return result

    async def timelines(self) -> list[dict[str, Any]]:
        """Every timeline this uid owns or holds (root: all)."""
        return await self._listing(Pager(p.Timelines, "timelines"))

    async def timeline(self, *, name: str | None = None) -> Timeline:
        """A new timeline at 0; this device is its only signaller."""
        return Timeline(self, *await self._call(p.MakeTimeline(name=name)))

    async def import_timeline(self, fd: int) -> Timeline:
        """The timeline behind handle ``fd``, to wait on; the caller keeps (and closes) ``fd``."""
        return Timeline(self, *await self._call(p.ImportTimeline(), [fd]))

    async def import_fence(self, fd: int) -> Fence:
        """The fence ``fd`` (a sync_file passed over a socket); the caller keeps ``fd``."""
        result, fds = await self._call(p.ImportFence(have=self._views.have()), [fd])
        return Fence(self, os.dup(fd), result, fds)

    async def merge_fences(self, first: Fence, second: Fence) -> Fence:
        """A new fence for both (SYNC_IOC_MERGE: the later point of a shared timeline)."""
        args = p.MergeFences(have=self._views.have())
        result, fds = await self._call(args, [first.fileno(), second.fileno()])
        return Fence(self, take_one_fd(fds[:1]), result, fds[1:])

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = (await self._call(p.Stats()))[0]
        return result

    async def streams(self) -> list[dict[str, Any]]:
        """Every stream this uid publishes (root: all), with subscribers and their lag."""
        return await self._listing(Pager(p.Streams, "streams"))

    def publish(self, name: str, *, size: int, slots: int = 4) -> _Opening[Publisher]:
        """A stream of frames of up to ``size`` bytes through a pool of ``slots`` slots."""

        async def start() -> Publisher:
            return Publisher(self, *await self._call(p.Publish(name=name, size=size, slots=slots)))

        return _Opening(start)

    def subscribe(self, name: str, *, timeout: float | None = None) -> _Opening[Subscriber]:
        """Join stream ``name`` at its next frame, waiting up to ``timeout`` s for it to exist."""

        async def start() -> Subscriber:
            return Subscriber(self, *await self._call(p.Subscribe(name=name, timeout=timeout)))

        return _Opening(start)

    async def aclose(self) -> None:
        """Disconnect now (``open_device``'s exit does it too); waiting tasks get EBADF."""
        self._close_now()
        await trio.lowlevel.checkpoint()


class Buffer(BufferBase, _AsyncClosing):
    _device: Device

    async def share(self, *, readonly: bool = False) -> int:
        """A new handle fd for this buffer, owned by the caller; read-only if asked."""
        return take_one_fd((await self._device._call(p.Share(buffer=self.id, readonly=readonly)))[1])

    async def seal(self) -> None:
        """Seal (Plasma's seal): from now on nobody can map it writable or write it (EPERM).

        Needs ``allocate(..., sealable=True)``. Once no writable mapping of it remains
        anywhere, the kernel makes it immutable (F_SEAL_WRITE); listings say when. When this
        returns, ``open(name, sealed=True)`` finds it.
        """
        self._sealed((await self._device._call(p.Seal(buffer=self.id)))[0])

    async def set_name(self, name: str | None) -> None:
        """Name (or, with None, unname) the buffer: at most 31 bytes of UTF-8."""
        await self._device._call(p.SetName(buffer=self.id, name=name))
        self.name = name or None

    def attach(self, *, on_move: Callable[[Attachment], Any] | None = None) -> _Opening[Attachment]:
        """``att = await buf.attach()``, or ``async with buf.attach() as att`` (detached on exit).

        With ``on_move`` (a function or coroutine function), the attachment is dynamic: see
        the blocking ``Buffer.attach``.
        """

        async def start() -> Attachment:
            result, _ = await self._device._call(p.Attach(buffer=self.id, dynamic=on_move is not None))
            attachment = Attachment(self, result["attachment"])
            if on_move is not None:
                self._device._moves.add(attachment, on_move)
            return attachment

        return _Opening(start)

    async def revoke(self) -> None:
        """Take an exported buffer back (see the blocking ``Buffer.revoke``)."""
        await self._device._call(p.Revoke(buffer=self.id))

    async def move(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Tell dynamic importers the memory moved (see the blocking ``Buffer.move``)."""
        result, _ = await self._device._call(p.Move(buffer=self.id, timeout=timeout))
        late: list[dict[str, Any]] = result["late"]
        return late

    def cpu_access(self, access: Access = Access.RW, *, timeout: float | None = None) -> CpuAccess:
        """``async with buf.cpu_access(Access.WRITE) as memory:`` (DMA_BUF_IOCTL_SYNC).

        Begins once the reservation's fences have signalled (READ: the writers', else all),
        waiting up to ``timeout`` s for them (ETIME).
        """
        return CpuAccess(self, access, timeout)

    async def attach_fence(self, fence: Fence, access: Access) -> None:
        """Add ``fence`` to the buffer's reservation as a writer's or a reader's (IMPORT_SYNC_FILE)."""
        await self._device._call(p.AttachFence(buffer=self.id, access=access), [fence.fileno()])

    async def export_fence(self, access: Access) -> Fence:
        """What ``access`` must wait for, now (EXPORT_SYNC_FILE): READ the writers, else all."""
        device = self._device
        args = p.ExportFence(buffer=self.id, access=access, have=device._views.have())
        result, fds = await device._call(args)
        return Fence(device, take_one_fd(fds[:1]), result, fds[1:])

    async def close(self) -> None:
        """Release this device's hold (EBUSY while attached) and close its own handle.

        A buffer that came mapped (``map=``) is unmapped, detached and released without
        waiting for the broker (EBUSY, changing nothing, while views of its memory are alive).
        """
        device = self._device
        if self.closed or device.closed:
            self._released()
        elif self.mapping is not None:
            attachment = self.mapping.attachment
            teardown = teardown_for(self.id, attachment.id)
            if not device._unmap_memory(self.mapping._memory):
                teardown = teardown[1:]  # unmapped already
            for args in teardown:
                device._send_unawaited(args)
            attachment.detached = True
            self._released()
            await trio.lowlevel.checkpoint()
        else:
            await device._settle(p.Release(buffer=self.id), self._released)


class Attachment(AttachmentBase, _AsyncClosing):
    buffer: Buffer

    def map(self, direction: Direction = Direction.BIDIRECTIONAL) -> _Opening[Mapping]:
        """``m = await att.map(d)``, or ``async with att.map(d) as m`` (unmapped on exit)."""

        async def start() -> Mapping:
            device = self.buffer._device
            result, fds = await device._call(p.Map(attachment=self.id, direction=direction))
            return Mapping(self, direction, device._map_memory(result, fds))

        return _Opening(start)

    async def detach(self) -> None:
        """Unlink the device (EBUSY while mapped)."""
        if not self.detached and not self.buffer._device.closed:
            await self.buffer._device._settle(p.Detach(attachment=self.id), self._detached)
        else:
            self._detached()

    def _detached(self) -> None:
        self.detached = True
        self.buffer._device._moves.discard(self.id)

    async def close(self) -> None:
        await self.detach()


class Mapping(MappingBase, _AsyncClosing):
    attachment: Attachment

    async def unmap(self) -> None:
        """Unmap (EBUSY, changing nothing, while views of ``memory`` are still alive)."""
        device = self.attachment.buffer._device
        if device._unmap_memory(self._memory):
            await device._call(p.Unmap(attachment=self.attachment.id), settle=True)

    async def close(self) -> None:
        await self.unmap()


class CpuAccess(CpuAccessBase):
    buffer: Buffer

    async def begin(self) -> memoryview:
        device = self.buffer._device
        args = p.CpuBegin(buffer=self.buffer.id, access=self.access, timeout=self.timeout)
        result, fds = await device._call(args)
        self._memory = device._map_memory(result, fds)
        return self._memory.lend()

    async def end(self) -> None:
        """End the access (EBUSY, changing nothing, while views of the memory are alive;
        EINVAL without ``begin``)."""
        device = self.buffer._device
        memory = self._check_begun()
        if memory is not None and device._unmap_memory(memory):
            await device._call(p.CpuEnd(buffer=self.buffer.id, access=self.access), settle=True)

    async def __aenter__(self) -> memoryview:
        return await self.begin()

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            await self.end()
        except BrokerError as failure:
            unclosed(error, failure)


async def send_handle(sock: trio.socket.SocketType, fd: int) -> None:
    """Send handle ``fd`` over a connected trio Unix socket; the caller still owns ``fd``."""
    await sock.sendmsg([p.HANDLE_MARK], p.ancillary([fd]))


async def recv_handle(sock: trio.socket.SocketType) -> int:
    """Receive one handle sent with ``send_handle`` (either flavour); the caller owns it."""
    _, ancdata, flags, _ = await sock.recvmsg(len(p.HANDLE_MARK), p.ancillary_space(4), p.RECV_FLAGS)
    return p.one_handle(p.fds_from_ancillary(ancdata, flags, 4))
