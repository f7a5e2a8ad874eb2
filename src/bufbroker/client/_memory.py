"""The client's view of backing memory: mmaps of the fds a map or cpu access hands over.

A mapping can only be closed once nobody still holds a view into it; Python's mmap refuses
(BufferError) rather than unmapping memory under a live memoryview, and we turn that into a
BrokerError(EBUSY) that says what to do, leaving the mapping usable.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Sequence
from typing import Any

from ..protocol import BrokerError, ProtocolError, Segment, close_all

__all__ = ["MappedMemory", "segments_from_wire"]


def segments_from_wire(raw: Any) -> list[Segment]:
    return [Segment.from_wire(entry) for entry in raw]


class MappedMemory:
    """The whole buffer mapped into this process, read-only unless ``writable``.

    The backing (``span`` bytes, whole pages of its heap) is mapped whole: a huge page mapping
    can only be unmapped whole. ``memory`` has the buffer's own ``size``.
    Takes ownership of ``fds``: they are closed once mapped (the mapping keeps the memory).
    """

    def __init__(
        self,
        fds: Sequence[int],
        segments: Sequence[Segment],
        size: int,
        writable: bool,
        span: int | None = None,
    ) -> None:
        span = size if span is None else span
        try:
            if len(fds) != 1 or any(s.fd != 0 for s in segments):
                raise ProtocolError(f"expected one backing descriptor, got {len(fds)}")
            if not 0 < size <= span:
                raise ProtocolError(f"a buffer of {size} bytes cannot lie in {span} bytes of backing")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mmap: mmap.mmap | None = mmap.mmap(fds[0], span, access=access)
        finally:
            close_all(fds)
        self.segments = list(segments)
        self.writable = writable
        self.size = size
        self._whole = memoryview(self._mmap)
        self.memory = self._whole[:size] if size < span else self._whole

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap; raises BrokerError(EBUSY), changing nothing, while views are still exported."""
        if self._mmap is None:
            return
        self.memory.release()
        self._whole.release()
        try:
            self._mmap.close()
        except BufferError:
            self._whole = memoryview(self._mmap)
            self.memory = self._whole[: self.size]
            raise BrokerError(
                errno.EBUSY,
                "the mapping's memory is still in use (a slice or another view of it is alive); "
                "release those views, then unmap again",
            ) from None
        self._mmap = None
