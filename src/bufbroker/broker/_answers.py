"""Checking what an exporter answered a map or cpu access with: the only trust boundary there.

An exporter is a client like any other, so its memfd gets the ``export_memfd`` rules (a
memfd, sealed against shrinking, not against writing, open read-write, mode safe to share)
and its scatter list must cover exactly the buffer's pages, in order, within what the
importer can address. Anything else is ``EIO`` for the importer: the exporter failed, as a
driver whose ``map_dma_buf`` returns garbage fails the importer's map.

``backing`` reads ``/proc/self/fd`` and fstats a descriptor a client supplied, which can
block (a FUSE file): the server runs it in a worker thread, never on its loop.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from ..protocol import PAGE_SIZE, BrokerError, Constraints, Segment, close_all
from ._heap import Backing, check_memfd
from ._layout import Layout, plan

__all__ = ["backing", "check_segments"]


def check_segments(raw: Any, size: int, constraints: Constraints, most: int) -> Layout:
    """The layout an answer's ``segments`` stands for, or BrokerError(EIO) saying why.

    Missing: the broker lays the memfd out for the importer, as it does its own buffers.
    Given: at most ``most`` (max_layout_segments), each as long as the first but the last,
    the layouts the broker itself makes, so that every reply stays within its bounds.
    """
    if raw is None:
        planned = plan(size, constraints)
        if planned is None or planned.count > most:
            raise BrokerError(errno.EIO, "no layout of the exporter's memory suits the importer")
        return planned
    if type(raw) is not list or not 0 < len(raw) <= most:
        raise BrokerError(errno.EIO, f"the exporter's segments are not a list of 1 to {most}")
    layout: list[Segment] = []
    at = 0
    for entry in raw:
        if (
            type(entry) is not list
            or len(entry) != 3
            or any(type(v) is not int for v in entry)
            or entry[0] != 0
            or entry[1] != at
            or entry[2] <= 0
            or entry[2] % PAGE_SIZE
        ):
            raise BrokerError(
                errno.EIO, f"exporter segment {entry!r} is not [0, {at}, a positive multiple of {PAGE_SIZE}]"
            )
        layout.append(Segment(at, entry[2]))
        at += entry[2]
    if at != size:
        raise BrokerError(errno.EIO, f"the exporter's segments cover {at} bytes of a {size}-byte buffer")
    uniform = Layout.from_segments(layout)
    if uniform is None:
        raise BrokerError(errno.EIO, "the exporter's segments are not all as long as the first but the last")
    if not uniform.satisfies(constraints):
        raise BrokerError(errno.EIO, "the exporter's segments break the importer's constraints")
    return uniform


def backing(
    result: Any, fds: Sequence[int], size: int, constraints: Constraints, writable: bool, most: int
) -> tuple[Layout, int]:
    """The layout and a new descriptor for the importer (read-only unless ``writable``).

    Closes ``fds`` (the exporter's) on every path: the importer gets the broker's own
    descriptor, reopened read-only where it may not write, never the exporter's.
    """
    try:
        if type(result) is not dict or set(result) - {"segments"}:
            raise BrokerError(errno.EIO, "the exporter's answer is not a map of {segments}")
        if len(fds) != 1:
            raise BrokerError(errno.EIO, f"the exporter answered with {len(fds)} descriptors, not one memfd")
        try:
            held = check_memfd(fds[0])
        except BrokerError as e:
            raise BrokerError(errno.EIO, f"the exporter's memfd is refused: {e.strerror}") from None
        if held != size:
            raise BrokerError(errno.EIO, f"the exporter's memfd holds {held} bytes, the buffer {size}")
        layout = check_segments(result.get("segments"), size, constraints, most)
        try:
            fd = Backing(fds[0], size).descriptors(writable)[0]
        except OSError as e:
            raise BrokerError(
                e.errno or errno.EMFILE, f"cannot hand out the exporter's memory: {e.strerror}"
            ) from None
        return layout, fd
    finally:
        close_all(fds)
