"""The client's view of backing memory: mmaps of the fds a map or cpu access hands over.

Memory must never be unmapped while anything can still reach it, or the next access through a
stale pointer crashes the process. Python's mmap keeps a count of the buffers exported from it
and refuses to close (BufferError) while any is alive; every view handed out here is a
memoryview of the mmap that is never released behind its holder's back, so anything that keeps
a view alive, whether a slice, a numpy array, ``pyarrow.py_buffer`` or a tensor that only holds
a reference to the memoryview (``torch.frombuffer`` releases its buffer and keeps the object),
keeps the count up and unmapping refuses with BrokerError(EBUSY), leaving the memory usable.

The one exception is the view ``cpu_access`` lends to its ``with`` block: the block's target
name still holds it when the block ends, so it may be held by that one name; it is released
when the access ends, unless something else holds it too.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
from collections.abc import Sequence

from ..protocol import BrokerError, ProtocolError, Segment, close_all

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MappedMemory", "segments_from_wire"]

# References to the lent view when only the lender and its one borrower hold it: the
# attribute, getrefcount's own argument, and one name (the ``with`` target).
_LENT_REFS = 3
_IN_USE = (
    "the mapping's memory is still in use (a slice, an array or another view of it is alive); "
    "release those views (del them, or call .release()), then unmap (or end) again"
)


def segments_from_wire(raw: Any) -> list[Segment]:
    return [Segment.from_wire(entry) for entry in raw]


class MappedMemory:
    """The whole buffer mapped into this process, read-only unless ``writable``.

    Takes ownership of ``fds``: the first is kept (for ``dup_fds``), the mapping keeps the
    memory.
    """

    def __init__(self, fds: Sequence[int], segments: Sequence[Segment], size: int, writable: bool) -> None:
        try:
            if len(fds) != 1 or any(s.fd != 0 for s in segments):
                raise ProtocolError(f"expected one backing descriptor, got {len(fds)}")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mmap: mmap.mmap | None = mmap.mmap(fds[0], size, access=access)
        except BaseException:
            close_all(fds)
            raise
        self._fd: int | None = fds[0]
        self.size = size
        self.segments = list(segments)
        self.writable = writable
        self._lent: memoryview | None = None

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def view(self) -> memoryview:
        """A new view of the whole memory; unmapping refuses while it (or a slice) is alive."""
        if self._mmap is None:
            raise BrokerError(errno.EINVAL, "the memory was unmapped")
        return memoryview(self._mmap)

    def lend(self) -> memoryview:
        """The view a ``with`` block's target may hold past the block's end (see above)."""
        self._lent = self.view()
        return self._lent

    def dup_fds(self) -> list[int]:
        """New descriptors of the backing (read-only where the mapping is), the caller's."""
        if self._fd is None:
            raise BrokerError(errno.EINVAL, "the memory was unmapped")
        return [os.dup(self._fd)]

    def close(self) -> None:
        """Unmap; raises BrokerError(EBUSY), unmapping nothing, while views are still alive.

        A lent view that only its borrower's name holds is released first (and stays released
        if other views then keep the memory mapped).
        """
        if self._mmap is None:
            return
        if self._lent is not None:
            if sys.getrefcount(self._lent) > _LENT_REFS:
                raise BrokerError(errno.EBUSY, _IN_USE)
            try:
                self._lent.release()
            except BufferError:  # a view was taken from the lent one
                raise BrokerError(errno.EBUSY, _IN_USE) from None
            self._lent = None
        try:
            self._mmap.close()
        except BufferError:
            raise BrokerError(errno.EBUSY, _IN_USE) from None
        self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Forget the memory without unmapping it: views still alive keep it mapped, and it is
        unmapped when the last of them goes (the device is closing)."""
        self._mmap = None
        self._lent = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
