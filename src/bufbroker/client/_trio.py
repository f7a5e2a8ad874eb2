"""The trio client: the blocking client's twin, for programs that run under trio.

Same names, as coroutines and async context managers. One reader task per device (in a
nursery the ``open_device`` context owns) matches replies to requests by id, so any number of
tasks may use one device at once, their requests pipelined. A task cancelled while waiting
leaves the connection usable: when its reply comes, its descriptors are closed and whatever it
created in the broker is undone (``_core.undo_for``).
"""

from __future__ import annotations

import mmap
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from socket import AF_UNIX, SOCK_CLOEXEC, SOCK_SEQPACKET  # `socket` is a parameter name here
from typing import Any, Generic, TypeVar

import trio

from .. import protocol as p
from .._paths import default_socket_path
from ..protocol import Access, BrokerError, BrokerUnavailable, Constraints, Direction
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
    maybe_one_fd,
    take_one_fd,
    undo_for,
)

__all__ = [
    "Attachment",
    "Buffer",
    "CpuAccess",
    "Device",
    "Mapping",
    "open_device",
    "recv_handle",
    "send_handle",
]

T = TypeVar("T", bound="_AsyncClosing")


class _AsyncClosing:
    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError


class _Opening(Generic[T]):
    """``await op(...)`` or ``async with op(...) as x``: the result, closed on exit if entered."""

    def __init__(self, start: Callable[[], Awaitable[T]]) -> None:
        self._start = start
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._start().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._start()
        return self._value

    async def __aexit__(self, *exc: Any) -> None:
        assert self._value is not None
        await self._value.close()


class _Waiter:
    __slots__ = ("args", "done", "message")

    def __init__(self, args: p.OpArgs) -> None:
        self.args = args
        self.done = trio.Event()
        self.message: p.Reply | p.Error | None = None


@asynccontextmanager
async def open_device(
    name: str, *, constraints: Constraints | None = None, socket: str | None = None
) -> AsyncIterator[Device]:
    """``async with open_device("camera") as dev``: this process (task tree) as a device."""
    path = socket or default_socket_path()
    sock = trio.socket.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)
    try:
        await sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise BrokerUnavailable(path, e.errno or 0) from None
    except BaseException:
        sock.close()
        raise
    device = Device(sock, Session(name, constraints))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device._read)
            result, _ = await device._call(device._session.hello_args())
            device._session.welcome(result)
            try:
                yield device
            finally:
                nursery.cancel_scope.cancel()
    finally:
        device._close_now()


class Device(DeviceBase):
    """This process as a device, for trio programs; see the blocking ``Device`` for each method."""

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        super().__init__(session)
        self._sock = sock
        self._send_lock = trio.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._abandoned: dict[int, p.OpArgs | None] = {}  # reply owed to a cancelled task
        self._lost: BrokerError | None = None

    async def _read(self) -> None:
        """The one task that receives: hands each reply to its waiter, cleans up after others."""
        inbox = mmap.mmap(-1, MAX_REPLY)
        ancbuf = p.ancillary_space(MAX_REPLY_FDS)
        try:
            while True:
                try:
                    n, ancdata, flags, _ = await self._sock.recvmsg_into([inbox], ancbuf, p.RECV_FLAGS)
                    fds = p.fds_from_ancillary(ancdata, flags, MAX_REPLY_FDS)
                    message = self._session.receive(memoryview(inbox)[:n], fds)
                except OSError as e:
                    self._fail(e if isinstance(e, BrokerError) else self._session.lost(e))
                    return
                if message is None:
                    self._fail(self._session.lost())
                    return
                if isinstance(message, p.Reply | p.Error):
                    await self._deliver(message)
        finally:
            inbox.close()

    async def _deliver(self, message: p.Reply | p.Error) -> None:
        waiter = self._waiting.pop(message.id, None) if message.id is not None else None
        if waiter is not None:
            waiter.message = message
            waiter.done.set()
            return
        p.close_all(message.fds)
        if message.id is None:  # the broker blames no request: it is about to hang up
            self._fail(message.exception())
        elif message.id in self._abandoned:
            args = self._abandoned.pop(message.id)
            if args is not None and isinstance(message, p.Reply):
                undo = undo_for(args, message.result)
                if undo is not None:
                    await self._send(undo, (), abandoned=True)

    def _fail(self, error: BrokerError) -> None:
        self._lost = error
        for waiter in self._waiting.values():
            waiter.done.set()

    async def _send(self, args: p.OpArgs, fds: Sequence[int], *, abandoned: bool = False) -> int:
        id, data = self._session.request(args)
        if abandoned:
            self._abandoned[id] = None  # nobody waits for the undo's own reply
        async with self._send_lock:
            await self._sock.sendmsg([data], p.ancillary(fds))
        return id

    async def _call(self, args: p.OpArgs, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        """One request: its result and the descriptors its reply carried (the caller's now)."""
        self._check_open()
        if self._lost is not None:
            raise self._lost
        waiter = _Waiter(args)
        id, data = self._session.request(args)
        self._waiting[id] = waiter
        try:
            async with self._send_lock:
                await self._sock.sendmsg([data], p.ancillary(fds))
        except BaseException as e:  # not sent (trio sends whole or not at all)
            del self._waiting[id]
            if isinstance(e, OSError) and not isinstance(e, BrokerError):
                raise self._session.lost(e) from None
            raise
        try:
            await waiter.done.wait()
        except BaseException:
            if self._waiting.pop(id, None) is not None:
                self._abandoned[id] = args  # its reply will be undone when it comes
            elif waiter.message is not None:  # it came just now: undo it here
                p.close_all(waiter.message.fds)
                if isinstance(waiter.message, p.Reply) and (undo := undo_for(args, waiter.message.result)):
                    with trio.CancelScope(shield=True):
                        await self._send(undo, (), abandoned=True)
            raise
        if waiter.message is None:
            assert self._lost is not None
            raise self._lost
        return self._session.outcome(waiter.message)

    async def _buffer(self, args: p.OpArgs, fds: Sequence[int] = ()) -> Buffer:
        result, got = await self._call(args, fds)
        return Buffer(self, result, maybe_one_fd(got))

    async def ping(self) -> None:
        await self._call(p.Ping())

    async def allocate(self, size: int, *, name: str | None = None, heap: str = "memfd") -> Buffer:
        return await self._buffer(p.Allocate(size=size, name=name, heap=heap))

    async def import_handle(self, fd: int) -> Buffer:
        return await self._buffer(p.Import(), [fd])

    async def open(self, name: str, *, timeout: float | None = None) -> Buffer:
        return await self._buffer(p.Open(name=name, timeout=timeout))

    async def export_memfd(self, memfd: int, *, name: str | None = None) -> Buffer:
        return await self._buffer(p.ExportMemfd(name=name), [memfd])

    async def _listing(self, pager: Pager) -> list[dict[str, Any]]:
        while pager.take((await self._call(pager.request()))[0]):
            pass
        return pager.entries

    async def buffers(self) -> list[dict[str, Any]]:
        return await self._listing(Pager(p.Buffers, "buffers"))

    async def devices(self) -> list[dict[str, Any]]:
        return await self._listing(Pager(p.Devices, "devices"))

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = (await self._call(p.Stats()))[0]
        return result

    def _close_now(self) -> None:
        if not self.closed:
            self._forget_local()
            self._sock.close()

    async def aclose(self) -> None:
        """Disconnect (``open_device``'s exit does it too)."""
        self._close_now()
        await trio.lowlevel.checkpoint()


class Buffer(BufferBase, _AsyncClosing):
    _device: Device

    async def share(self, *, readonly: bool = False) -> int:
        return take_one_fd((await self._device._call(p.Share(buffer=self.id, readonly=readonly)))[1])

    async def set_name(self, name: str | None) -> None:
        await self._device._call(p.SetName(buffer=self.id, name=name))
        self.name = name or None

    def attach(self) -> _Opening[Attachment]:
        """``att = await buf.attach()``, or ``async with buf.attach() as att`` (detached on exit)."""

        async def start() -> Attachment:
            result, _ = await self._device._call(p.Attach(buffer=self.id))
            return Attachment(self, result["attachment"])

        return _Opening(start)

    def cpu_access(self, access: Access = Access.RW) -> CpuAccess:
        """``async with buf.cpu_access(Access.WRITE) as memory:``."""
        return CpuAccess(self, access)

    async def close(self) -> None:
        if not self.closed and not self._device.closed:
            await self._device._call(p.Release(buffer=self.id))
        self._released()


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
        if not self.detached and not self.buffer._device.closed:
            await self.buffer._device._call(p.Detach(attachment=self.id))
        self.detached = True

    async def close(self) -> None:
        await self.detach()


class Mapping(MappingBase, _AsyncClosing):
    attachment: Attachment

    async def unmap(self) -> None:
        device = self.attachment.buffer._device
        if device._unmap_memory(self._memory):
            await device._call(p.Unmap(attachment=self.attachment.id))

    async def close(self) -> None:
        await self.unmap()


class CpuAccess(CpuAccessBase):
    buffer: Buffer

    async def begin(self) -> memoryview:
        device = self.buffer._device
        result, fds = await device._call(p.CpuBegin(buffer=self.buffer.id, access=self.access))
        self._memory = device._map_memory(result, fds)
        return self._memory.memory

    async def end(self) -> None:
        device = self.buffer._device
        if self._memory is not None and device._unmap_memory(self._memory):
            await device._call(p.CpuEnd(buffer=self.buffer.id, access=self.access))

    async def __aenter__(self) -> memoryview:
        return await self.begin()

    async def __aexit__(self, *exc: Any) -> None:
        await self.end()


async def send_handle(sock: trio.socket.SocketType, fd: int) -> None:
    """Send handle ``fd`` over a connected trio Unix socket; the caller still owns ``fd``."""
    await sock.sendmsg([p.HANDLE_MARK], p.ancillary([fd]))


async def recv_handle(sock: trio.socket.SocketType) -> int:
    """Receive one handle sent with ``send_handle`` (either flavour); the caller owns it."""
    _, ancdata, flags, _ = await sock.recvmsg(len(p.HANDLE_MARK), p.ancillary_space(4), p.RECV_FLAGS)
    return p.one_handle(p.fds_from_ancillary(ancdata, flags, 4))
