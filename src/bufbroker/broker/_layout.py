"""Choosing a buffer's layout (its scatter list) for the devices attached to it.

This is the exporter's job in dma_buf_ops.map_dma_buf: collate the attached devices'
constraints, then pick backing storage that suits every one. Combined constraints are the
tightest of each: the smallest max_segment_size, the fewest max_segments, the largest
alignment (alignments are powers of two, so the largest is their least common multiple).

With the memfd heap every segment lies in one memfd and the segments partition it, so a
segment's offset is the sum of the lengths before it. The plan that needs the fewest segments
cuts the buffer into pieces of the longest allowed length, and everything fits iff that
count is within max_segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..protocol import Constraints, Segment

__all__ = ["combine", "plan", "satisfies"]


def combine(constraints: Iterable[Constraints]) -> Constraints:
    """The tightest of each constraint among ``constraints``."""
    mss: int | None = None
    ms: int | None = None
    al: int | None = None
    for c in constraints:
        if c.max_segment_size is not None:
            mss = c.max_segment_size if mss is None else min(mss, c.max_segment_size)
        if c.max_segments is not None:
            ms = c.max_segments if ms is None else min(ms, c.max_segments)
        if c.alignment is not None:
            al = c.alignment if al is None else max(al, c.alignment)
    return Constraints(max_segment_size=mss, max_segments=ms, alignment=al)


def plan(size: int, c: Constraints) -> list[Segment] | None:
    """The layout with the fewest segments that meets ``c``, or None if none can."""
    longest = size if c.max_segment_size is None else min(size, c.max_segment_size)
    if c.alignment is not None and longest < size:
        # Every segment but the last must end on an aligned offset for the next to start on one.
        longest -= longest % c.alignment
        if longest == 0:
            return None
    count = -(-size // longest)
    if c.max_segments is not None and count > c.max_segments:
        return None
    return [Segment(offset, min(longest, size - offset)) for offset in range(0, size, longest)]


def satisfies(layout: Sequence[Segment], c: Constraints) -> bool:
    """Whether an existing layout already meets ``c`` (attach after allocation)."""
    if c.max_segments is not None and len(layout) > c.max_segments:
        return False
    for seg in layout:
        if c.max_segment_size is not None and seg.length > c.max_segment_size:
            return False
        if c.alignment is not None and seg.offset % c.alignment:
            return False
    return True
