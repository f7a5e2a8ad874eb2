"""The trio device's connection: one reader task, requests pipelined, cancellation undone.

One reader task per device (in a nursery the ``open_device`` context owns) matches replies to
requests by id, so any number of tasks may use one device at once, their requests pipelined.
``Link`` is that machinery; ``_trio.Device`` adds the ops on top of it.

Theory of cancellation. trio sends a packet whole or not at all, so a request is either unsent
(nothing to do) or sent. A task cancelled after sending leaves its id in ``_abandoned``; when
the reply comes, the reader closes its descriptors and sends, without waiting, the request
that takes back what the abandoned one created (``_core.undo_for``: release, detach, unmap,
cpu end). Requests that give something back (the same four, when an object closes) are the
reverse: if the task is cancelled before they are sent, they are sent anyway, so the broker
ends up holding what the local objects say. Requests the reader sends are written before it
reads the next reply, and the broker answers in order (except ``open`` with a timeout and
``cpu_begin`` waiting on fences), so once a round trip sent after them completes, the broker
has applied them: ``await dev.ping()`` does as many as that takes, and so settles the state.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import deque
from collections.abc import Callable, Sequence
from socket import socket as _stdlib_socket
from typing import Any

import trio

from .. import protocol as p
from ..protocol import BrokerError, Direction
from ._core import MAX_REPLY, MAX_REPLY_FDS, DeviceBase, Session, teardown_for, undo_for

__all__ = ["Link"]


class _Waiter:
    __slots__ = ("done", "message")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: p.Reply | p.Error | None = None


class Link(DeviceBase):
    """The connection of a trio device: sends, the reader task, and what cancellation leaves."""

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
                    elif isinstance(message, p.Call | p.Event):
                        self._dispatch(message)
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
        id, waiter = await self._send_request(args, fds, settle=settle)
        return await self._await_reply(id, args, waiter)

    async def _send_request(
        self, args: p.OpArgs, fds: Sequence[int] = (), *, settle: bool = False
    ) -> tuple[int, _Waiter]:
        """Send one request; its id and the waiter its reply will wake."""
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
        return id, waiter

    async def _await_reply(self, id: int, args: p.OpArgs, waiter: _Waiter) -> tuple[Any, list[int]]:
        """The reply to request ``id`` (sent with ``args``); a cancelled wait leaves it undone."""
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

    async def _chain(
        self, args: p.OpArgs, fds: Sequence[int], direction: Direction
    ) -> list[tuple[Any, list[int]]]:
        """``args`` (which makes a buffer), attach and map it, sent together: one round trip.

        The replies of the three, in order. If any fails or the wait is cancelled, what the
        chain made is given back without waiting (unmap, detach, release, each naming the
        request that made its object), and nothing is left behind.
        """
        first, waiter = await self._send_request(args, fds)
        sent = [(first, args, waiter)]
        answers: list[tuple[Any, list[int]]] = []
        try:
            attach = p.Attach(buffer=p.Ref(first))
            second, waiter = await self._send_request(attach)
            sent.append((second, attach, waiter))
            mapping = p.Map(attachment=p.Ref(second), direction=direction)
            third, waiter = await self._send_request(mapping)
            sent.append((third, mapping, waiter))
            for id, request, waiting in sent:
                answers.append(await self._await_reply(id, request, waiting))
        except BaseException:
            for id, _, _ in sent[len(answers) :]:
                if self._waiting.pop(id, None) is not None or id in self._abandoned:
                    self._abandoned[id] = None  # dropped when it comes: the teardown gives it back
            for _, got in answers:
                p.close_all(got)
            second_ref = p.Ref(sent[1][0]) if len(sent) > 1 else None
            for undo in teardown_for(p.Ref(first), second_ref):
                self._send_unawaited(undo)
            raise
        return answers

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

    def _dispatch(self, message: p.Call | p.Event) -> None:
        """A call from the broker (to an exporter) or an event: the device's to serve."""

    def _close_now(self) -> None:
        if not self.closed:
            self._forget_local()
            self._fail(BrokerError(errno.EBADF, "the device is closed"))
            self._reading.cancel()  # before the close, which would wake it with an error
            self._raw.detach()  # the descriptor is trio's socket's to close
            self._sock.close()
