"""What the broker says to a device unasked: events, and notices and calls to exporters.

They go out in the order they were posted, after nothing: sent at once while the socket has
room (a plain non-blocking send, no task), else queued for the connection's own sending task.
A peer that leaves ``limit`` of them queued does not read its socket; it is hung up on rather
than kept in an unbounded queue.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from .. import protocol as p

__all__ = ["Outbox"]


class Outbox:
    def __init__(
        self,
        raw: socket.socket,
        send: Callable[[bytes, Sequence[int]], Awaitable[None]],
        limit: int,
        hang_up: Callable[[str], None],
    ) -> None:
        self._raw = raw
        self._send = send
        self._limit = limit
        self._hang_up = hang_up
        self._queue: deque[bytes] = deque()
        self._ready = trio.Event()

    def post(self, message: p.Event | p.Call) -> None:
        """Send ``message`` soon, after those posted before it; never waits."""
        data = p.encode(message)
        if not self._queue:
            try:
                self._raw.send(data)
                return
            except BlockingIOError:
                pass
            except OSError:
                self._hang_up("")
                return
        if len(self._queue) >= self._limit:
            self._hang_up("it left max_queued_events messages unread")
            return
        self._queue.append(data)
        self._ready.set()

    async def run(self) -> None:
        """Send what ``post`` queued, in order, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            while self._queue:
                await self._send(self._queue[0], ())
                self._queue.popleft()
