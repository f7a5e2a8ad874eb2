"""Seal (Plasma's seal, with the kernel as the proof): the state model's part.

A sealable buffer's memfd is made without F_SEAL_SEAL. ``seal`` then goes in two steps, as
the kernel allows:

1. at once, F_SEAL_FUTURE_WRITE: no new writable mapping and no write(2), for every holder of
   any descriptor, even one reopened through /proc/self/fd; mappings made before keep working;
2. F_SEAL_WRITE, the kernel's proof that nobody can write the memory any more, as soon as no
   writable mapping remains anywhere (the kernel refuses it with EBUSY until then).

The broker counts the writable mappings it handed out (maps in a writing direction, WRITE and
RW cpu access); when a sealed buffer's count reaches zero it is handed to the server's sealer
(``unwritten``), which adds F_SEAL_WRITE off the event loop and tries again while a process
still holds a writable mapping the broker was not told about (a fork, a client that kept its
mmap). The fcntl calls themselves run in worker threads: adding a seal takes the inode lock,
which a writer's long write(2) may hold, and F_SEAL_WRITE waits for pinned pages.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import BrokerError
from ._heap import F_SEAL_FUTURE_WRITE, Backing
from ._records import Buffer, Device, Ref

if TYPE_CHECKING:
    from ._heaps import Heap
    from ._state import Observer

__all__ = ["Sealing", "add_seal", "writers"]


def writers(buffer: Buffer) -> int:
    """Writable mappings of ``buffer`` the broker handed out that are still in place."""
    maps = sum(1 for a in buffer.attachments.values() if a.map_count and a.direction and a.direction.writes)
    return maps + sum(count for (_, access), count in buffer.cpu.items() if access.writes)


def add_seal(backing: Backing, seal: int) -> Callable[[], None]:
    """A call that adds ``seal`` to ``backing``, for a worker thread (on a duplicate descriptor)."""
    fd = os.dup(backing.fd)

    def run() -> None:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seal)
        finally:
            os.close(fd)

    return run


class Sealing:
    """Mixed into ``State``: the rules of sealing, and who may write what."""

    heaps: dict[str, Heap]
    observer: Observer
    # Called with a sealed buffer once the broker counts no writable mapping of it: the server
    # then adds F_SEAL_WRITE. The default does nothing (a state model without a server).
    unwritten: Callable[[Buffer], None] = staticmethod(lambda buffer: None)

    def _ref(self, device: Device, buffer_id: int) -> Ref:
        raise NotImplementedError

    def _materialize(self, buffer: Buffer, device: Device) -> tuple[object, Backing]:
        raise NotImplementedError

    def _may_write(self, device: Device, buffer: Buffer) -> None:
        """Raise unless ``device`` may get a new writable mapping of ``buffer``."""
        if buffer.sealing:
            raise BrokerError(errno.EPERM, f"buffer {buffer.id} is sealed: it can only be read")
        heap = self.heaps.get(buffer.heap)
        if heap is not None and not heap.shared_writers and device.uid != buffer.owner:
            raise BrokerError(
                errno.EACCES,
                f"only uid {buffer.owner} may write {buffer.heap} buffer {buffer.id}: the kernel "
                "cannot stop a writer of it from shrinking it under other users' mappings",
            )

    def seal(self, device: Device, buffer_id: int) -> Backing | None:
        """Begin to seal: the backing to add F_SEAL_FUTURE_WRITE to, or None if it has it.

        From here on, new writable mappings are refused (EPERM), before the kernel's seal is
        in place; ``sealed`` or ``seal_failed`` finishes.
        """
        ref = self._ref(device, buffer_id)
        buffer = ref.buffer
        if not ref.writable:
            raise BrokerError(errno.EACCES, "a read-only handle cannot seal its buffer")
        if not buffer.sealable:
            raise BrokerError(
                errno.EINVAL, f"buffer {buffer_id} was not allocated sealable (allocate(..., sealable=True))"
            )
        if buffer.sealed:
            return None
        _, backing = self._materialize(buffer, device)  # sealed before any map: zeros, for ever
        buffer.sealing = True
        return backing

    def seal_failed(self, buffer: Buffer) -> None:
        if not buffer.sealed:
            buffer.sealing = False

    def now_sealed(self, buffer: Buffer) -> None:
        """F_SEAL_FUTURE_WRITE is in place."""
        buffer.sealed = buffer.sealing = True
        self.observer.changed(buffer)
        self._maybe_unwritten(buffer)

    def now_immutable(self, buffer: Buffer) -> None:
        """F_SEAL_WRITE is in place."""
        buffer.immutable = True
        self.observer.changed(buffer)

    def _maybe_unwritten(self, buffer: Buffer) -> None:
        if buffer.sealed and not buffer.immutable and not writers(buffer):
            self.unwritten(buffer)

    def kernel_seals(self, buffer: Buffer) -> None:
        """Take the seal state from the kernel (a backing restored after a restart)."""
        if buffer.backing is None or not buffer.sealable:
            return
        try:
            seals = fcntl.fcntl(buffer.backing.fd, fcntl.F_GET_SEALS)
        except OSError:
            return
        buffer.sealed = buffer.sealing = bool(seals & F_SEAL_FUTURE_WRITE)
        buffer.immutable = bool(seals & fcntl.F_SEAL_WRITE)
        self._maybe_unwritten(buffer)
