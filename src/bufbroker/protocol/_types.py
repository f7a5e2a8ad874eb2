"""Values shared by every side of the protocol: directions, access modes, constraints, segments.

They mirror include/linux/dma-direction.h and the DMA_BUF_SYNC_* flags; on the wire they travel
as their lower-case names so that a dump of a message reads without a table.
"""

from __future__ import annotations

import enum
import errno
import mmap
from collections import namedtuple

from ._errors import BrokerError
from ._record import Record

__all__ = ["PAGE_SIZE", "Access", "Constraints", "Direction", "Segment", "page_round"]

PAGE_SIZE = mmap.PAGESIZE


def page_round(size: int) -> int:
    """``size`` rounded up to a whole number of pages, as dma-buf exporters round."""
    return -(-size // PAGE_SIZE) * PAGE_SIZE


class Direction(enum.Enum):
    """Which way the device moves data (``enum dma_data_direction``)."""

    BIDIRECTIONAL = "bidirectional"
    TO_DEVICE = "to_device"  # the device reads memory: the mapping is read-only
    FROM_DEVICE = "from_device"  # the device writes memory

    @property
    def writes(self) -> bool:
        return self is not Direction.TO_DEVICE


class Access(enum.Enum):
    """CPU access mode for begin/end (``DMA_BUF_SYNC_READ / WRITE / RW``)."""

    READ = "read"
    WRITE = "write"
    RW = "rw"

    @property
    def writes(self) -> bool:
        return self is not Access.READ


class Constraints(Record):
    """What a device can address; ``None`` means no limit (``struct device_dma_parameters``)."""

    max_segment_size: int | None = None
    max_segments: int | None = None
    alignment: int | None = None

    def _check(self) -> None:
        mss, ms, al = self.max_segment_size, self.max_segments, self.alignment
        if mss is not None and (mss <= 0 or mss % PAGE_SIZE):
            raise BrokerError(errno.EINVAL, f"max_segment_size must be a positive multiple of {PAGE_SIZE}")
        if ms is not None and ms <= 0:
            raise BrokerError(errno.EINVAL, "max_segments must be at least 1")
        if al is not None and (al < PAGE_SIZE or al & (al - 1)):
            raise BrokerError(errno.EINVAL, f"alignment must be a power of two of at least {PAGE_SIZE}")

    def to_wire(self) -> dict[str, int]:
        return {
            key: value
            for key, value in (
                ("max_segment_size", self.max_segment_size),
                ("max_segments", self.max_segments),
                ("alignment", self.alignment),
            )
            if value is not None
        }


TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import NamedTuple

    class _SegmentFields(NamedTuple):
        offset: int
        length: int
        fd: int = 0
else:
    _SegmentFields = namedtuple("_SegmentFields", ("offset", "length", "fd"), defaults=(0,))


class Segment(_SegmentFields):
    """One scatter-list entry: ``length`` bytes at ``offset`` in backing fd number ``fd``.

    A named tuple rather than a record: the broker keeps one per segment of every live buffer,
    and a tuple is the smallest object that holds three numbers.
    """

    __slots__ = ()

    def to_wire(self) -> list[int]:
        """``[fd_index, offset, length]``, as layouts travel (docs/PROTOCOL.md)."""
        return [self.fd, self.offset, self.length]

    @classmethod
    def from_wire(cls, raw: list[int]) -> Segment:
        fd, offset, length = raw
        return cls(int(offset), int(length), int(fd))
