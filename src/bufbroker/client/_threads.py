"""The blocking client's threads, for a device that must hear from the broker unasked.

A plain blocking device reads the socket only while some caller waits for a reply (whichever
caller holds the device's reader lock reads for all, see ``_sync_link.Link._await``). An
exporter must answer calls whenever they come, and an importer with a dynamic attachment must
hear of a move while it does something else, so such a device switches, once, to two threads
of its own: a *reader* that takes the reader lock for good and reads every packet, parking
each reply for the caller whose id it bears (callers then only wait, with their own
timeouts), and a *server* that runs exporter calls, move callbacks and the exporter's error
events one after another. Calls and callbacks may use the device themselves: the reader
keeps reading meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import protocol as p
from ..protocol import BrokerError
from ._exporting import CallServer

if TYPE_CHECKING:
    from ._sync_link import Link

__all__ = ["Served"]

log = logging.getLogger("bufbroker.client")


class Served:
    """Reader and server threads for one blocking device."""

    def __init__(self, device: Link, calls: CallServer | None, on_event: Callable[[p.Event], None]) -> None:
        self._device = device
        self._calls = calls
        self._on_event = on_event
        self._jobs: queue.SimpleQueue[p.Call | p.Event | None] = queue.SimpleQueue()
        name = device._session.name
        self._reader = threading.Thread(target=self._read, name=f"bufbroker-reader-{name}", daemon=True)
        self._server = threading.Thread(target=self._serve, name=f"bufbroker-server-{name}", daemon=True)
        self._reader.start()
        self._server.start()

    def _read(self) -> None:
        device = self._device
        session = device._session
        with device._reader:  # held for good: callers wait for what this thread parks
            try:
                while True:
                    packet = device._receive(None, True, None)
                    assert packet is not None  # no time limit: a packet, or an error
                    job = session.route(*packet)
                    if job is not None:
                        self._jobs.put(job)
                    elif session.parked:
                        self._wake()
                    if session.undo:
                        device._send_undo()
            except BrokerError as e:
                device._lost = e
            except Exception as e:  # a bug here must not leave callers waiting for ever
                log.exception("the reader of %s failed", session.name)
                device._lost = BrokerError(errno.EIO, f"the device's reader failed: {e!r}")
            finally:
                self._jobs.put(None)
        self._wake()

    def _wake(self) -> None:
        state = self._device._state
        with state:
            state.notify_all()

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
                self._send(job, *answer)

    def _send(self, call: p.Call, data: bytes, fds: list[int]) -> None:
        device = self._device
        with device._send_lock, contextlib.suppress(OSError):
            try:
                device._sock.sendmsg([data], p.ancillary(fds))
            except (OSError, ValueError, TypeError, OverflowError) as e:
                if isinstance(e, OSError) and e.errno not in (errno.EBADF, errno.EINVAL):
                    raise  # the connection is ending: the reader reports it
                device._sock.send(CallServer.failed(call, OSError(errno.EBADF, str(e))))

    def stop(self) -> None:
        """Wake the reader (the socket is shut down) and wait for both threads."""
        with contextlib.suppress(OSError):
            self._device._sock.shutdown(socket.SHUT_RDWR)
        for thread in (self._reader, self._server):
            if thread is not threading.current_thread():
                thread.join(10)
