"""The blocking client's threads, for a device that must hear from the broker unasked.

A plain blocking device reads the socket only while it waits for a reply. An exporter must
answer calls whenever they come, and an importer with a dynamic attachment must hear of a
move while it does something else, so such a device switches, once, to two threads of its
own: a *reader* that receives every packet (replies go to the caller waiting for them, by
id) and a *server* that runs exporter calls and move callbacks one after another. Calls and
callbacks may use the device themselves: the reader keeps reading meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .. import protocol as p
from ..protocol import BrokerError
from ._core import MAX_REPLY, Session
from ._exporting import CallServer

__all__ = ["Served"]

log = logging.getLogger("bufbroker.client")

_MAX_FDS = 16  # an exporter's calls carry none; replies at most a few


class _Slot:
    __slots__ = ("done", "message")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.message: p.Reply | p.Error | None = None


class Served:
    """Reader and server threads for one blocking device's socket."""

    def __init__(
        self,
        sock: socket.socket,
        session: Session,
        send_lock: threading.Lock,
        calls: CallServer | None,
        on_event: Callable[[p.Event], None],
    ) -> None:
        self._sock = sock
        self._session = session
        self._send_lock = send_lock
        self._calls = calls
        self._on_event = on_event
        self._waiting: dict[int, _Slot] = {}
        self._lost: BrokerError | None = None
        self._jobs: queue.SimpleQueue[p.Call | p.Event | None] = queue.SimpleQueue()
        self._reader = threading.Thread(
            target=self._read, name=f"bufbroker-reader-{session.name}", daemon=True
        )
        self._server = threading.Thread(
            target=self._serve, name=f"bufbroker-server-{session.name}", daemon=True
        )
        self._reader.start()
        self._server.start()

    def call(self, args: p.OpArgs, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        """One request, its reply handed over by the reader."""
        slot = _Slot()
        with self._send_lock:
            if self._lost is not None:
                raise self._lost
            id, data = self._session.request(args)
            self._waiting[id] = slot
            try:
                if fds:
                    self._sock.sendmsg([data], p.ancillary(fds))
                else:
                    self._sock.send(data)
            except OSError as e:
                self._waiting.pop(id, None)
                raise self._lost or self._session.lost(e) from None
        slot.done.wait()
        if slot.message is None:
            assert self._lost is not None
            raise self._lost
        return self._session.outcome(slot.message)

    def _read(self) -> None:
        inbox = mmap.mmap(-1, MAX_REPLY)
        ancbuf = p.ancillary_space(_MAX_FDS)
        error: BrokerError | None = None
        try:
            while True:
                try:
                    n, ancdata, flags, _ = self._sock.recvmsg_into([inbox], ancbuf, p.RECV_FLAGS)
                    fds = p.fds_from_ancillary(ancdata, flags, _MAX_FDS)
                    message = self._session.receive(memoryview(inbox)[:n], fds)
                except ConnectionResetError:
                    continue  # what the broker sent before hanging up follows
                except OSError as e:
                    error = e if isinstance(e, BrokerError) else self._session.lost(e)
                    return
                if message is None:
                    error = self._session.lost()
                    return
                if isinstance(message, p.Reply | p.Error):
                    self._deliver(message)
                elif isinstance(message, p.Call | p.Event):
                    self._jobs.put(message)
        finally:
            self._fail(error or self._session.lost())
            self._jobs.put(None)
            inbox.close()

    def _deliver(self, message: p.Reply | p.Error) -> None:
        with self._send_lock:
            slot = self._waiting.pop(message.id, None) if message.id is not None else None
        if slot is None:
            p.close_all(message.fds)
            if message.id is None:  # the broker blames no request: it is about to hang up
                self._fail(message.exception())
            return
        slot.message = message
        slot.done.set()

    def _fail(self, error: BrokerError) -> None:
        with self._send_lock:
            if self._lost is None:
                self._lost = error
            waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot.done.set()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, p.Event):
                try:
                    if self._calls is not None:
                        self._calls.event(job)
                    self._on_event(job)
                except Exception:
                    log.exception("a callback for the %s event failed", job.name)
                continue
            if self._calls is None:
                continue  # not an exporter: the broker sends no calls
            value, error = CallServer.run(self._calls.method(job))
            answer = CallServer.answer(job, value, error)
            if answer is not None:
                data, fds = answer
                with self._send_lock, contextlib.suppress(OSError):
                    try:
                        self._sock.sendmsg([data], p.ancillary(fds))
                    except (OSError, ValueError, TypeError, OverflowError) as e:
                        if isinstance(e, OSError) and e.errno not in (errno.EBADF, errno.EINVAL):
                            raise
                        self._sock.send(CallServer.failed(job, OSError(errno.EBADF, str(e))))

    def stop(self) -> None:
        """Wake the reader (the socket is shut down) and wait for both threads."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        for thread in (self._reader, self._server):
            if thread is not threading.current_thread():
                thread.join(10)
