"""The blocking client's connection: sends, waiting for replies, and what an abandoned call
leaves; the part of the blocking Device that does I/O, as ``_trio_link`` is the trio one's.

Threads may share a device: each sends its request whole, and whichever waits reads the
socket for all, handing each reply to the thread whose id it bears.
"""

from __future__ import annotations

import _socket  # the C module: socket.py costs start-up time
import mmap
import struct
import threading
import time
from collections.abc import Sequence

from .. import protocol as p
from ..protocol import BrokerError, Direction
from ._core import MAX_REPLY, MAX_REPLY_FDS, DeviceBase, Session, teardown_for

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

    from ._exporting import CallServer, MoveCallbacks
    from ._threads import Served

__all__ = ["Link", "timeval"]


def timeval(seconds: float | None) -> bytes:
    """SO_RCVTIMEO/SO_SNDTIMEO's struct timeval; 0 means no limit, so a limit is at least 1 µs."""
    if seconds is None:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6)
    return struct.pack("ll", whole, micro if whole else max(1, micro))



class Link(DeviceBase):
    """A blocking device's connection to the broker."""

    def __init__(self, sock: _socket.socket, session: Session) -> None:
        super().__init__(session)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._reader = threading.Lock()  # held by the thread reading the socket for everyone
        self._state = threading.Condition(threading.Lock())  # where the other threads wait
        self._idle = 0  # threads waiting on _state
        self._recv_limit = session.timeout  # what SO_RCVTIMEO is set to
        self._lost: BrokerError | None = None
        self._ancbuf = p.ancillary_space(MAX_REPLY_FDS)
        # One receive buffer for the device's life (a fresh 256 KiB per reply would cost an
        # mmap/munmap pair in malloc on every round trip), of anonymous memory so that only the
        # pages replies touch are resident.
        self._inbox = mmap.mmap(-1, MAX_REPLY)
        self._served: Served | None = None  # reader and server threads (exporters, dynamic attachments)
        self._moves: MoveCallbacks | None = None  # on_move callbacks of dynamic attachments

    def _serve_in_threads(self, calls: CallServer | None = None) -> None:
        """From now on a thread reads the socket, and another runs calls and move callbacks."""
        from ._exporting import MoveCallbacks
        from ._threads import Served

        with self._send_lock:
            if self._moves is None:
                self._moves = MoveCallbacks()
            if self._served is None:
                self._served = Served(self, calls, self._on_event)

    def _on_event(self, event: p.Event) -> None:
        callback = self._moves.callback(event) if self._moves is not None else None
        if callback is not None:
            callback()

    def _receive(
        self, reset: OSError | None, with_fds: bool, limit: float | None
    ) -> tuple[memoryview, list[int]] | None:
        """The next packet and its descriptors; None if ``limit`` seconds pass first.

        Without ``with_fds`` (a reply that carries none; events and errors never do) a plain
        receive does, a little cheaper; descriptors sent all the same would be closed by the
        kernel, having nowhere to go.
        """
        if limit != self._recv_limit:
            self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, timeval(limit))
            self._recv_limit = limit
        ancdata: list[tuple[int, int, bytes]] = []
        flags = 0
        while True:
            try:
                if with_fds:
                    n, ancdata, flags, _ = self._sock.recvmsg_into([self._inbox], self._ancbuf, p.RECV_FLAGS)
                else:
                    n = self._sock.recv_into(self._inbox)
                break
            except BlockingIOError:
                return None
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

    def _call(
        self, args: p.OpArgs, fds: Sequence[int] = (), *, timeout: float | None = None
    ) -> tuple[Any, list[int]]:
        """One request: its result and the descriptors its reply carried (the caller's now)."""
        self._check_open()
        if self._session.undo:
            self._send_undo()
        id, reset = self._send(args, fds)
        return self._answer(id, args, reset, timeout)

    def _send(self, args: p.OpArgs, fds: Sequence[int] = ()) -> tuple[int, OSError | None]:
        """Send one request; its id, and the reset the broker's hang-up left, if it hung up."""
        session = self._session
        with self._send_lock:
            id, data = session.request(args)
            session.waiting.add(id)  # before sending: another thread may read the reply
            try:
                if fds:
                    self._sock.sendmsg([data], p.ancillary(fds))
                else:
                    self._sock.send(data)
            except (BrokenPipeError, ConnectionResetError) as e:
                return id, e  # the broker hung up; what it sent before may say why
            except BlockingIOError:  # SO_SNDTIMEO: the broker has not read for that long
                session.waiting.discard(id)
                raise session.timed_out(args, session.timeout or 0) from None
            except OSError as e:
                session.waiting.discard(id)
                raise (session.sent_fds_error(args, e) or session.lost(e)) from None
        return id, None

    def _answer(
        self, id: int, args: p.OpArgs, reset: OSError | None, timeout: float | None = None
    ) -> tuple[Any, list[int]]:
        """The answer to request ``id`` (sent with ``args``): its result and descriptors."""
        session = self._session
        # The device's own limit unless the call has one (open waits in the broker too).
        limit = (
            session.timeout
            if timeout is None and type(args) is not p.Open
            else session.wait_limit(args, timeout)
        )
        try:
            return self._await(id, args, limit, reset)
        except BaseException as e:
            if id in session.waiting:  # a timeout, Ctrl-C: the reply will be undone
                session.abandon(id, args)
            if isinstance(e, BrokerError):
                raise session.explain(args, e) from None
            raise

    def _await(
        self, id: int, args: p.OpArgs, limit: float | None, reset: OSError | None
    ) -> tuple[Any, list[int]]:
        """Wait for request ``id``'s answer: read the socket if no other thread is, else wait
        for the reader to park it or to leave the socket to us.

        The lone caller's path takes one uncontended lock. A waiting thread counts
        itself in ``_idle`` under ``_state`` and tries the reader's lock once more before it
        sleeps, and the reader looks at ``_idle`` after letting go of the lock, so no wake-up
        is lost between the two.
        """
        session = self._session
        deadline = None if limit is None else time.monotonic() + limit
        wait = limit
        while True:
            if self._reader.acquire(False):
                try:
                    parked = session.parked.pop(id, None)
                    if parked is not None:
                        session.waiting.discard(id)
                        return session.outcome(parked)
                    if self._lost is not None:
                        session.waiting.discard(id)
                        raise self._lost
                    answer = self._read_one(id, args, reset, wait)
                finally:
                    self._reader.release()
                    if self._idle:
                        with self._state:
                            self._state.notify_all()
                if answer is not None:
                    return answer
            else:
                with self._state:
                    self._idle += 1
                    try:
                        if not self._reader.locked() or id in session.parked:
                            pass  # the socket is free, or our answer came: no sleep
                        else:
                            self._state.wait(wait)
                    finally:
                        self._idle -= 1
                parked = session.parked.pop(id, None)
                if parked is not None:
                    session.waiting.discard(id)
                    return session.outcome(parked)
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise session.timed_out(args, limit or 0)

    def _read_one(
        self, id: int, args: p.OpArgs, reset: OSError | None, limit: float | None
    ) -> tuple[Any, list[int]] | None:
        """Read one packet for whoever waits: our answer, or None (parked for another thread,
        an event, a late reply undone, or ``limit`` passed)."""
        session = self._session
        try:
            packet = self._receive(reset, args.reply_fds or len(session.waiting) > 1, limit)
        except BrokerError as e:
            self._lost = e
            session.waiting.discard(id)
            raise
        if packet is None:
            return None
        try:
            answer = session.answer(id, *packet)
        except BrokerError:
            session.waiting.discard(id)
            raise
        if answer is not None:
            session.waiting.discard(id)
            return answer
        if session.parked and self._idle:  # another thread's answer: wake it
            with self._state:
                self._state.notify_all()
        if session.undo:
            self._send_undo()
        return None

    def _send_undo(self) -> None:
        """Send the requests that take back what abandoned ones created; their replies are
        dropped when they come."""
        session = self._session
        with self._send_lock:
            while session.undo:
                id, data = session.request(session.undo.pop(0))
                session.abandoned[id] = None
                try:
                    self._sock.send(data)
                except OSError:
                    return  # the connection is ending: the broker drops everything it held

    def _chain(self, args: p.OpArgs, fds: Sequence[int], direction: Direction) -> list[tuple[Any, list[int]]]:
        """``args`` (which makes a buffer), attach and map it, sent together: one round trip.

        The replies of the three, in order; if one fails, or the wait is interrupted, what the
        chain made is given back without waiting, and the error raised.
        """
        self._check_open()
        if self._session.undo:
            self._send_undo()
        first, reset = self._send(args, fds)
        attach = p.Attach(buffer=p.Ref(first))
        second, _ = self._send(attach)
        mapping = p.Map(attachment=p.Ref(second), direction=direction)
        third, _ = self._send(mapping)
        answers: list[tuple[Any, list[int]]] = []
        try:
            for id, request in ((first, args), (second, attach), (third, mapping)):
                answers.append(self._await(id, request, self._session.wait_limit(request), reset))
        except BaseException:
            self._give_back([first, second, third][len(answers) :], first, second, answers)
            raise
        return answers

    def _give_back(
        self, unanswered: list[int], first: int, second: int, answers: list[tuple[Any, list[int]]]
    ) -> None:
        """A chain that failed part way: whatever it made is given back, without waiting."""
        session = self._session
        for id in unanswered:
            if id in session.waiting:
                session.waiting.discard(id)
                session.abandoned[id] = None  # its reply is dropped when it comes
        for _, fds in answers:
            p.close_all(fds)
        session.undo.extend(teardown_for(p.Ref(first), p.Ref(second)))
        self._send_undo()
