"""The trio client: the blocking client's twin, for programs that run under trio.

Same names, as coroutines and async context managers. One reader task per device (in a
nursery the ``open_device`` context owns) matches replies to requests by id, so any number of
tasks may use one device at once, their requests pipelined.

Theory of cancellation. trio sends a packet whole or not at all, so a request is either unsent
(nothing to do) or sent. A task cancelled after sending leaves its id in ``_abandoned``; when
the reply comes, the reader closes its descriptors and sends, without waiting, the request
that takes back what the abandoned one created (``_core.undo_for``: release, detach, unmap,
cpu end). Requests that give something back (the same four, when an object closes) are the
reverse: if the task is cancelled before they are sent, they are sent anyway, so the broker
ends up holding what the local objects say. Requests the reader sends are written before it
reads the next reply, and the broker answers in order (except ``open`` with a timeout), so
once a round trip sent after them completes, the broker has applied them: ``await
dev.ping()`` does as many as that takes, and so settles the state.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from socket import AF_UNIX, SOCK_CLOEXEC, SOCK_SEQPACKET  # `socket` is a parameter name here
from socket import socket as _stdlib_socket
from typing import Any, Generic, TypeVar

import trio

from .. import protocol as p
from .._paths import default_socket_path
from ..protocol import Access, BrokerError, Constraints, Direction
from ._core import (
    DEFAULT_TIMEOUT,
    MAX_REPLY,
    MAX_REPLY_FDS,
    AttachmentBase,
    BufferBase,
    CpuAccessBase,
    DeviceBase,
    MappingBase,
    Pager,
    Session,
    connect_error,
    exportable,
    maybe_one_fd,
    take_one_fd,
    unclosed,
    undo_for,
)
from ._exporting import CallServer, Exporter, MoveCallbacks
from ._trio_serving import dispatch

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

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            await self.close()
        except BrokerError as failure:
            unclosed(error, failure)

    async def close(self) -> None:
        raise NotImplementedError


class _Opening(Generic[T]):
    """``await op(...)`` or ``async with op(...) as x``: the result, closed on exit if entered.

    The same two spellings as ``trio.open_file`` (awaited) and ``trio.open_nursery``
    (entered); ``async with await op(...)`` works too, since the result is itself an async
    context manager.
    """

    def __init__(self, start: Callable[[], Awaitable[T]]) -> None:
        self._start = start
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._start().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._start()
        return self._value

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        assert self._value is not None
        await self._value.__aexit__(kind, error, tb)


class _Waiter:
    __slots__ = ("done", "message")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: p.Reply | p.Error | None = None


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


class Device(DeviceBase):
    """This process as a device, for trio programs; made by ``open_device``."""

    def __init__(self, sock: trio.socket.SocketType, session: Session, nursery: trio.Nursery) -> None:
        super().__init__(session)
        self._sock = sock
        # The same socket as a plain non-blocking stdlib object, for sends and receives that
        # complete at once (most do): trio's socket calls pass through the scheduler even
        # then. Only waits go through trio. Never used once the device is closed.
        self._raw = _stdlib_socket(fileno=sock.fileno())
        self._raw.setblocking(False)
        self._nursery = nursery
        self._reading = trio.CancelScope()  # the reader's own: cancelling it spares the block
        self._send_lock = trio.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._abandoned: dict[int, p.OpArgs | None] = {}  # replies nobody waits for; None: drop
        self._backlog: deque[bytes] = deque()  # unawaited requests waiting for room to send
        self._unawaited_sent = 0  # unawaited requests written to the socket so far
        self._lost: BrokerError | None = None
        self._gone = trio.Event()  # set with _lost
        self._calls: CallServer | None = None  # an exporter's
        self._moves = MoveCallbacks()
        self._jobs: trio.MemorySendChannel[p.Call | p.Event] | None = None  # see _trio_serving

    # --- the connection: the only part that differs from the blocking client

    async def _read(self) -> None:
        """The one task that receives: hands each reply to its waiter, undoes abandoned ones."""
        inbox = mmap.mmap(-1, MAX_REPLY)
        ancbuf = p.ancillary_space(MAX_REPLY_FDS)
        reset: OSError | None = None
        try:
            with self._reading:
                while True:
                    try:
                        packet = await self._receive(inbox, ancbuf)
                        if packet is None:
                            return  # closed by this device: _close_now has failed the waiters
                        n, ancdata, flags, _ = packet
                        fds = p.fds_from_ancillary(ancdata, flags, MAX_REPLY_FDS)
                        message = self._session.receive(memoryview(inbox)[:n], fds)
                    except trio.ClosedResourceError:
                        return  # closed by this device: _close_now has failed the waiters
                    except ConnectionResetError as e:
                        # The broker hung up with requests of ours unread. The kernel reports
                        # that once, before the packets the broker had sent, which may say why
                        # (an error with no id, e.g. a connection limit): read on to the end.
                        reset = e
                        continue
                    except OSError as e:
                        self._fail(e if isinstance(e, BrokerError) else self._session.lost(e))
                        return
                    if message is None:
                        self._fail(self._session.lost(reset))
                        return
                    if isinstance(message, p.Reply | p.Error):
                        self._deliver(message)
                    elif isinstance(message, p.Call) or (
                        isinstance(message, p.Event) and (self._moves or self._calls)
                    ):
                        dispatch(self, message)
        finally:
            inbox.close()

    async def _receive(self, inbox: mmap.mmap, ancbuf: int) -> tuple[int, Any, int, Any] | None:
        """The next packet as ``recvmsg_into`` gives it; None once the device is closed.

        Taken with a plain non-blocking call; only the wait goes through trio. With no call
        waiting for a reply it waits first, as a look would find nothing. The descriptor is
        never touched once the device is closed: its number may by then be another file's.
        """
        wait = not self._waiting
        while not self.closed:
            if wait:
                await trio.lowlevel.wait_readable(self._raw)
                if self.closed:
                    break
            try:
                return self._raw.recvmsg_into([inbox], ancbuf, p.RECV_FLAGS)
            except BlockingIOError:
                wait = True
        return None

    def _deliver(self, message: p.Reply | p.Error) -> None:
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
                self._undo(args, message.result)

    def _undo(self, args: p.OpArgs, result: Any) -> None:
        undo = undo_for(args, result)
        if undo is not None:
            self._send_unawaited(undo)

    def _send_unawaited(self, args: p.OpArgs) -> None:
        """Send ``args`` now, from synchronous code, and drop its reply when it comes.

        Written straight to the socket (a SEQPACKET write is one whole packet, so it cannot
        interleave with a send another task has under way); only if the socket is full does a
        task in the device's nursery send it, and later ones queue behind it, in order. Never
        waits, so the reader cannot block on a full socket while the broker blocks on ours.
        """
        if self.closed or self._lost is not None:
            return  # the broker drops everything the connection held
        id, data = self._session.request(args)
        self._abandoned[id] = None
        if not self._backlog:
            try:
                os.write(self._sock.fileno(), data)
                self._unawaited_sent += 1
                return
            except BlockingIOError:
                self._nursery.start_soon(self._flush)
            except OSError:
                return  # the connection is ending; the reader reports it
        self._backlog.append(data)

    async def _flush(self) -> None:
        try:
            while self._backlog:
                async with self._send_lock:
                    await self._sock.send(self._backlog[0])
                self._backlog.popleft()
                self._unawaited_sent += 1
        except (OSError, trio.ClosedResourceError):
            self._backlog.clear()  # the connection is ending

    def _fail(self, error: BrokerError) -> None:
        """Wake every waiting task with ``error``; later calls raise it too."""
        if self._lost is None:
            self._lost = error
            self._gone.set()
        for waiter in self._waiting.values():
            waiter.done.set()
        self._waiting.clear()
        self._abandoned.clear()

    async def _call(
        self, args: p.OpArgs, fds: Sequence[int] = (), *, settle: bool = False
    ) -> tuple[Any, list[int]]:
        """One request: its result and the descriptors its reply carried (the caller's now).

        With ``settle`` (a request that gives something back), a cancelled task's request is
        sent all the same.
        """
        self._check_open()
        if self._lost is not None:
            raise self._lost
        waiter = _Waiter()
        id, data = self._session.request(args)
        self._waiting[id] = waiter
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled call sends nothing
            try:
                if fds:
                    self._raw.sendmsg([data], p.ancillary(fds))
                else:
                    self._raw.send(data)
            except BlockingIOError:  # the socket is full: wait for room, the trio way
                limit = self._session.timeout
                with trio.move_on_after(float("inf") if limit is None else limit) as waited:
                    async with self._send_lock:
                        await self._sock.sendmsg([data], p.ancillary(fds))
                if waited.cancelled_caught:  # not sent: the broker has not read for that long
                    raise self._session.timed_out(args, limit or 0) from None
        except trio.Cancelled:  # not sent
            del self._waiting[id]
            if settle:
                self._send_unawaited(args)
            raise
        except (OSError, trio.ClosedResourceError) as e:
            self._waiting.pop(id, None)
            if isinstance(e, BrokerError):  # timed out waiting to send
                if settle:
                    self._send_unawaited(args)
                raise
            self._check_open()  # closed by another task while this one waited to send
            local = self._session.sent_fds_error(args, e) if isinstance(e, OSError) else None
            if local is not None:  # the caller's mistake: the connection is fine
                raise local from None
            if isinstance(e, BrokenPipeError | ConnectionResetError):
                # The broker hung up, maybe having said why (a connection limit): the reader
                # reaches that word, or the end of file, at once.
                await self._gone.wait()
            raise self._lost or self._session.lost(e if isinstance(e, OSError) else None) from None
        except BaseException:
            del self._waiting[id]
            raise
        try:
            limit = self._session.wait_limit(args)
            with trio.move_on_after(float("inf") if limit is None else limit) as waited:
                await waiter.done.wait()
            if waited.cancelled_caught:
                raise self._session.timed_out(args, limit or 0)
        except BaseException:
            if self._waiting.pop(id, None) is not None:
                self._abandoned[id] = args  # undone when its reply comes
            elif waiter.message is not None:  # it came just now: undo it here
                p.close_all(waiter.message.fds)
                if isinstance(waiter.message, p.Reply):
                    self._undo(args, waiter.message.result)
            raise
        if waiter.message is None:
            self._check_open()
            assert self._lost is not None
            raise self._lost
        try:
            return self._session.outcome(waiter.message)
        except BrokerError as e:
            raise self._session.explain(args, e) from None

    async def _settle(self, args: p.OpArgs, done: Callable[[], None]) -> None:
        """A request that gives something back; ``done`` updates the local object once it is
        sent, even if the task is cancelled while waiting (the broker will have applied it).
        """
        try:
            await self._call(args, settle=True)
        except trio.Cancelled:
            done()
            raise
        done()

    def _close_now(self) -> None:
        if not self.closed:
            self._forget_local()
            self._fail(BrokerError(errno.EBADF, "the device is closed"))
            self._reading.cancel()  # before the close, which would wake it with an error
            self._raw.detach()  # the descriptor is trio's socket's to close
            self._sock.close()

    # --- the same methods as the blocking Device, in the same order

    async def _buffer(self, args: p.OpArgs, fds: Sequence[int] = ()) -> Buffer:
        result, got = await self._call(args, fds)
        return Buffer(self, result, maybe_one_fd(got))

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
        self, size: int, *, name: str | None = None, heap: str = "memfd", sealable: bool = False
    ) -> Buffer:
        """A new buffer of ``size`` bytes (rounded up to pages); its memory comes at first map."""
        return await self._buffer(p.Allocate(size=size, name=name, heap=heap, sealable=sealable))

    async def import_handle(self, fd: int) -> Buffer:
        """The buffer behind handle ``fd``; the caller keeps (and should close) ``fd``."""
        return await self._buffer(p.Import(), [fd])

    async def open(
        self, name: str, *, timeout: float | None = None, sealed: bool = False, uid: int | None = None
    ) -> Buffer:
        """The buffer this uid named ``name``; waits up to ``timeout`` s for it to appear.

        Each uid has names of its own; root opens another uid's by saying whose (``uid``).
        With ``sealed``, only once it is sealed (Plasma's get): EAGAIN if it is not by then.
        """
        return await self._buffer(p.Open(name=name, timeout=timeout, sealed=sealed, uid=uid))

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

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = (await self._call(p.Stats()))[0]
        return result

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

    def cpu_access(self, access: Access = Access.RW) -> CpuAccess:
        """``async with buf.cpu_access(Access.WRITE) as memory:`` (DMA_BUF_IOCTL_SYNC)."""
        return CpuAccess(self, access)

    async def close(self) -> None:
        """Release this device's hold (EBUSY while attached) and close its own handle."""
        if not self.closed and not self._device.closed:
            await self._device._settle(p.Release(buffer=self.id), self._released)
        else:
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
        result, fds = await device._call(p.CpuBegin(buffer=self.buffer.id, access=self.access))
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
