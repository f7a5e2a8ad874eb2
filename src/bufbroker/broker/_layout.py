"""Choosing a buffer's layout (its scatter list) for the devices attached to it.

This is the exporter's job in dma_buf_ops.map_dma_buf: collate the attached devices'
constraints, then pick backing storage that suits every one. Combined constraints are the
tightest of each: the smallest max_segment_size, the fewest max_segments, the largest
alignment (alignments are powers of two, so the largest is their least common multiple).

With the memfd heap every segment lies in one memfd and the segments partition it, so a
segment's offset is the sum of the lengths before it. The plan that needs the fewest segments
cuts the buffer into pieces of the longest allowed length, and everything fits iff that
count is within max_segments.

Such a layout is two numbers, whatever its length: the size and the length of every segment
but the last. So it is planned, checked and stored in constant time and space; only a reply
spells its segments out, and a layout longer than one reply can carry is refused before
anything is fixed (a client's constraints decide the length, so its cost must not depend on it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol import Constraints, Segment

__all__ = ["Layout", "combine", "plan"]


@dataclass(frozen=True, slots=True)
class Layout:
    """``size`` bytes cut into segments of ``length`` bytes, the last one shorter if need be."""

    size: int
    length: int

    @property
    def count(self) -> int:
        return -(-self.size // self.length)

    def segments(self) -> list[Segment]:
        size, length = self.size, self.length
        return [Segment(offset, min(length, size - offset)) for offset in range(0, size, length)]

    def to_wire(self) -> list[list[int]]:
        return [s.to_wire() for s in self.segments()]

    def satisfies(self, c: Constraints) -> bool:
        """Whether this layout already meets ``c`` (attach after allocation)."""
        if c.max_segments is not None and self.count > c.max_segments:
            return False
        if c.max_segment_size is not None and min(self.length, self.size) > c.max_segment_size:
            return False
        # Offsets are the multiples of ``length``: all aligned iff ``length`` is (or there is one).
        return c.alignment is None or self.count == 1 or self.length % c.alignment == 0

    @classmethod
    def from_segments(cls, segments: list[Segment]) -> Layout | None:
        """The layout these segments spell out, if they are one (a stored snapshot's)."""
        if not segments:
            return None
        layout = cls(sum(s.length for s in segments), segments[0].length)
        return layout if layout.segments() == segments else None


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


def plan(size: int, c: Constraints) -> Layout | None:
    """The layout with the fewest segments that meets ``c``, or None if none can."""
    longest = size if c.max_segment_size is None else min(size, c.max_segment_size)
    if c.alignment is not None and longest < size:
        # Every segment but the last must end on an aligned offset for the next to start on one.
        longest -= longest % c.alignment
        if longest == 0:
            return None
    layout = Layout(size, longest)
    if c.max_segments is not None and layout.count > c.max_segments:
        return None
    return layout
