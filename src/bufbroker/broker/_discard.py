"""Closing what clients gave the broker, off the event loop.

A descriptor a client sends is closed by the broker when no op keeps it: surplus descriptors,
one that is not the handle it claimed to be, a refused memfd. Such a close can block for as
long as the client likes: a TCP socket with SO_LINGER and unsent data waits out its linger in
close(), a populated memfd frees its pages inside close() (about 100 ms per GiB here), a
socket with descriptors queued in it closes those too. So they are closed in the broker's
worker threads (``_workers``), one batch per uid at a time: a uid whose closes are slow waits
behind its own, nobody else does. A uid with more than MOST descriptors waiting to be closed
has its connections wait (``wait_room``) before reading their next request, so it cannot fill
the broker's table.

Sockets are closed abortively (SO_LINGER with a zero timeout, as a reset): the broker has no
use for what a client queued in a socket it threw away, and a lingering close would keep the
descriptor, which may be one of those kept for root, for as long as the client chose.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
from collections import defaultdict

import trio

from .. import protocol as p
from ._workers import Workers

__all__ = ["MOST", "Discard"]

MOST = 256  # descriptors of one uid waiting to be closed before its connections wait
_ABORT = struct.pack("ii", 1, 0)  # struct linger: on, zero seconds


def _close_all(fds: list[int]) -> None:
    """Close each of ``fds``, a socket without lingering; runs in a worker thread."""
    for fd in fds:
        with contextlib.suppress(OSError):  # not a socket: a plain close
            sock = socket.socket(fileno=fd)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
            finally:
                sock.detach()
        with contextlib.suppress(OSError):
            os.close(fd)


class Discard:
    def __init__(self, workers: Workers) -> None:
        self._workers = workers
        self._queued: defaultdict[int, list[int]] = defaultdict(list)
        self._waiting: dict[int, int] = {}  # uid → descriptors queued or being closed
        self._room: dict[int, trio.Event] = {}  # set when a uid is back under MOST
        self._work = trio.lowlevel.ParkingLot()
        self._busy: set[int] = set()  # uids with a thread at work

    def close(self, uid: int, fds: list[int]) -> None:
        """Close ``fds`` (which the caller gives up) in a worker thread; returns at once."""
        if fds:
            self._queued[uid].extend(fds)
            self._waiting[uid] = self._waiting.get(uid, 0) + len(fds)
            self._work.unpark_all()

    def pending(self, uid: int) -> int:
        return self._waiting.get(uid, 0)

    async def wait_room(self, uid: int) -> None:
        """Return once ``uid`` has at most MOST descriptors waiting to be closed."""
        while self._waiting.get(uid, 0) > MOST:
            room = self._room.setdefault(uid, trio.Event())
            await room.wait()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                for uid in list(self._queued):
                    if uid not in self._busy:
                        self._busy.add(uid)
                        nursery.start_soon(self._drain, uid)
                await self._work.park()

    async def _drain(self, uid: int) -> None:
        try:
            while fds := self._queued.pop(uid, None):
                await self._workers.run(uid, functools.partial(_close_all, fds))
                left = self._waiting[uid] - len(fds)
                if left:
                    self._waiting[uid] = left
                else:
                    del self._waiting[uid]
                if left <= MOST and (room := self._room.pop(uid, None)) is not None:
                    room.set()
        finally:
            self._busy.discard(uid)

    def close_now(self) -> None:
        """Close whatever is still queued, here and now (the broker is stopping)."""
        for fds in self._queued.values():
            with contextlib.suppress(OSError):
                p.close_all(fds)
        self._queued.clear()
