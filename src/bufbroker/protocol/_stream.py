"""A stream's control page: the layout every process reads, and the arithmetic on it, with no I/O.

A stream's pool is one sealed memfd: this page, then ``slots`` slots of ``stride`` bytes each
(a multiple of the page size), slot ``i`` at offset ``PAGE_BYTES + i * stride``. Frames are
numbered from 1 (``seq``) and frame ``seq`` lives in slot ``(seq - 1) % slots``. Every field
is a 64-bit unsigned integer in the machine's byte order, 8-byte aligned (as in a timeline's
page, so no reader sees half of a value)::

    word 0   MAGIC      identifies the layout (and its version)
    word 1   slots      how many slots the pool has
    word 2   size       the largest frame, in bytes
    word 3   stride     bytes from one slot to the next
    word 4   members    bumped by the broker each time a subscriber joins or leaves
    word 5-7            zero (reserved)
    word 8 + 4*i        slot i's header: seq, size (bytes used), timestamp (CLOCK_MONOTONIC
                        nanoseconds when it was sent), zero

The publisher writes a slot's frame and header, then signals the stream's frame timeline to
``seq``; a subscriber that sees the timeline reach ``seq`` reads the header, then the frame.
The publisher reuses the slot of frame ``seq`` for frame ``seq + slots`` only once every
subscriber's release timeline has reached ``seq``. Only the broker writes ``members``; only
the publisher writes anything else.
"""

from __future__ import annotations

import errno

from ._errors import BrokerError

__all__ = [
    "MAGIC",
    "MAX_SLOTS",
    "PAGE_BYTES",
    "Control",
    "bump_members",
    "check",
    "frame_header",
    "init",
    "members",
    "slot_of",
    "stride_for",
    "write_header",
]

PAGE_BYTES = 4096
MAGIC = 0x0001_7473_6262  # "bbst", layout 1
MAX_SLOTS = 64
_MAGIC, _SLOTS, _SIZE, _STRIDE, _MEMBERS = range(5)
_HEADERS = 8
_HEADER_WORDS = 4

Control = memoryview
"""The control page cast to unsigned 64-bit words (``memoryview(mmap).cast("Q")``)."""


def stride_for(size: int) -> int:
    """Bytes from one slot to the next: ``size`` rounded up to the page."""
    return -(-size // PAGE_BYTES) * PAGE_BYTES


def init(control: Control, slots: int, size: int) -> None:
    control[_SLOTS] = slots
    control[_SIZE] = size
    control[_STRIDE] = stride_for(size)
    control[_MAGIC] = MAGIC


def check(control: Control) -> tuple[int, int, int]:
    """The pool's (slots, size, stride); EPROTO if the page is not a stream's."""
    slots, size, stride = int(control[_SLOTS]), int(control[_SIZE]), int(control[_STRIDE])
    if control[_MAGIC] != MAGIC or not 0 < slots <= MAX_SLOTS or stride != stride_for(size) or not size:
        raise BrokerError(errno.EPROTO, "the stream's control page has an unknown layout")
    return slots, size, stride


def members(control: Control) -> int:
    return int(control[_MEMBERS])


def bump_members(control: Control) -> None:
    """A different value, whatever the publisher (who can write the page) left in the word."""
    control[_MEMBERS] = (control[_MEMBERS] + 1) & 0xFFFF_FFFF_FFFF_FFFF


def slot_of(seq: int, slots: int) -> int:
    return (seq - 1) % slots


def write_header(control: Control, slot: int, seq: int, size: int, now_ns: int) -> None:
    """The publisher's record of a frame, stored before the frame timeline is signalled."""
    base = _HEADERS + _HEADER_WORDS * slot
    control[base + 1] = size
    control[base + 2] = now_ns
    control[base] = seq


def frame_header(control: Control, slot: int) -> tuple[int, int, int]:
    """(seq, size, timestamp) of the frame in ``slot``."""
    base = _HEADERS + _HEADER_WORDS * slot
    return int(control[base]), int(control[base + 1]), int(control[base + 2])
