"""What a map, a cpu access and a seal need done in the kernel before their reply: the backing
committed (huge pages, shm), the seals added; and the reply a map or cpu access gets.

The kernel work runs in the broker's worker threads (``_workers``), charged to the uid that
asked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
from typing import Any

import trio

from .. import protocol as p
from ..protocol import BrokerError
from ._heap import F_SEAL_FUTURE_WRITE
from ._heaps import commit
from ._records import Buffer, Device
from ._seal import add_seal, writers
from ._state import State
from ._workers import Workers

__all__ = ["Sealer", "map_result", "prepare_backing", "seal"]

log = logging.getLogger("bufbroker.broker")

RETRY_FIRST = 0.01  # seconds before F_SEAL_WRITE is tried again after EBUSY, doubling
RETRY_MOST = 2.0


def map_result(segments: list[list[int]], size: int, span: int, writable: bool) -> dict[str, Any]:
    """A map or cpu access reply: ``span``, the backing's length, only where it is not ``size``
    (a buffer that is not a whole number of pages, a huge page one): a client of version 1
    that never asks for such buffers sees exactly the reply it always did."""
    result: dict[str, Any] = {"segments": segments, "size": size, "writable": writable}
    if span != size:
        result["span"] = span
    return result


def _buffer_of(device: Device, args: p.OpArgs) -> Buffer | None:
    """The buffer a map or cpu access (references resolved) is about, if the device has it."""
    match args:
        case p.Map(attachment=int(att_id)):
            att = device.attachments.get(att_id)
            return None if att is None else att.buffer
        case p.CpuBegin(buffer=int(buffer_id)):
            ref = device.refs.get(buffer_id)
            return None if ref is None else ref.buffer
    return None


async def prepare_backing(state: State, workers: Workers, device: Device, args: p.OpArgs) -> None:
    """Before a map or cpu access: make the backing, and commit its memory if its heap wants.

    Anything wrong with the request itself is left for the state model to refuse.
    """
    buffer = _buffer_of(device, args)
    heap = None if buffer is None else state.heaps.get(buffer.heap)
    if buffer is None or heap is None or not heap.commits:
        return  # a memfd's backing is made at map time, with nothing to commit
    if buffer.backing is not None and not buffer.backing.lazy:
        return
    backing = state.materialize(buffer, device)
    if backing.lazy:
        await workers.run(device.uid, commit(heap, backing))
        backing.lazy = False


async def seal(state: State, workers: Workers, device: Device, buffer_id: int) -> Buffer:
    """``seal``: F_SEAL_FUTURE_WRITE, in place when this returns (the reply means it)."""
    backing = state.seal(device, buffer_id)
    buffer = device.refs[buffer_id].buffer
    if backing is None:
        return buffer
    try:
        await workers.run(device.uid, add_seal(backing, F_SEAL_FUTURE_WRITE))
    except OSError as e:
        state.seal_failed(buffer)
        if e.errno == errno.EPERM:  # a writer added F_SEAL_SEAL (or sealed) first
            raise BrokerError(errno.EPERM, "the kernel refuses the seal: a holder sealed it itself") from None
        raise BrokerError(e.errno or errno.EIO, f"cannot seal: {e.strerror}") from None
    state.now_sealed(buffer)
    return buffer


class Sealer:
    """Adds F_SEAL_WRITE to sealed buffers once the broker counts no writable mapping of them.

    The kernel may still refuse (EBUSY): some process kept a writable mapping the broker was
    not told of (it forked, or unmapped without saying so). Then it tries again, less often
    each time, up to every RETRY_MOST seconds, while the buffer lives.
    """

    def __init__(self, state: State, workers: Workers) -> None:
        self._state = state
        self._workers = workers
        self._due: dict[Buffer, tuple[float, float]] = {}  # buffer: (when, current delay)
        self._wake = trio.Event()

    def want(self, buffer: Buffer) -> None:
        """Called by the state model (``unwritten``) when a sealed buffer's last writer unmapped."""
        if buffer not in self._due:
            self._due[buffer] = (-math.inf, RETRY_FIRST)
            self._wake.set()

    async def run(self) -> None:
        while True:
            soonest = min((when for when, _ in self._due.values()), default=math.inf)
            with trio.move_on_at(soonest):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            for buffer, (when, delay) in list(self._due.items()):
                if when <= now:
                    await self._try(buffer, delay)

    async def _try(self, buffer: Buffer, delay: float) -> None:
        state = self._state
        backing = buffer.backing
        if buffer.id not in state.buffers or buffer.immutable or backing is None or writers(buffer):
            del self._due[buffer]  # freed, done, or written again: the next unmap asks again
            return
        try:
            await self._workers.run(buffer.owner, add_seal(backing, fcntl.F_SEAL_WRITE))
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.warning("cannot make buffer %d immutable: %s", buffer.id, e)
                del self._due[buffer]
                return
            self._due[buffer] = (trio.current_time() + delay, min(delay * 2, RETRY_MOST))
            return
        del self._due[buffer]
        if buffer.id in state.buffers:
            state.now_immutable(buffer)
