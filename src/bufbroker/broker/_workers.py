"""Work that can block on what a client did, done in worker threads, bounded per uid.

Closing a client's descriptor (a lingering socket, a populated memfd), checking the memfd an
exporter answered with, committing huge pages or shm (fallocate zeroes every page), adding a
seal (it takes the inode lock a writer's long write(2) may hold; F_SEAL_WRITE waits for pinned
pages), writing a timeline's eventfd (any holder can make it block): none of it may stall the
event loop, which serves everyone. Each runs in a thread, at most PER_UID at once for the uid
that caused it, so one uid's work queues behind its own, and at most THREADS at once in all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["PER_UID", "THREADS", "Workers"]

PER_UID = 2  # worker threads one uid's requests may occupy at once
THREADS = 8  # worker threads for all uids together

T = TypeVar("T")


class Workers:
    """Worker threads, with a cap per uid; limiters exist only while a uid uses them."""

    def __init__(self) -> None:
        self._limiters: dict[int, trio.CapacityLimiter] = {}
        self._all = trio.CapacityLimiter(THREADS)

    async def run(self, uid: int, call: Callable[[], T]) -> T:
        """Run ``call`` in a thread for ``uid``; it must close what it holds even if nobody
        waits for it (the wait is shielded: a cancelled caller still waits for the thread)."""
        limiter = self._limiters.get(uid)
        if limiter is None:
            limiter = self._limiters[uid] = trio.CapacityLimiter(PER_UID)
        try:
            # Shielded: the call owns descriptors that only it closes.
            with trio.CancelScope(shield=True):
                async with limiter:  # the uid's own slot first: its queue never holds others' slots
                    result = await trio.to_thread.run_sync(call, limiter=self._all)
            return result
        finally:
            if not limiter.borrowed_tokens and not limiter.statistics().tasks_waiting:
                self._limiters.pop(uid, None)
