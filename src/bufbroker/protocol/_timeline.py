"""A timeline's page: the layout every process reads, and the arithmetic on it, with no I/O.

A timeline is one 4 KiB page of shared memory plus one eventfd. The page is the truth; the
eventfd only says "look again". Every field is a 64-bit unsigned integer in the machine's byte
order (little-endian on the machines Linux runs this on), 8-byte aligned, so that each load and
store is one instruction and no reader sees half of a value::

    slot 0  MAGIC        identifies the layout (and its version)
    slot 1  value        the last point signalled; only goes up
    slot 2  promised     the highest point a fence was made for (the broker writes it)
    slot 3  error        0, or the errno that failed the timeline (sticky: the first one stays)
    slot 4  error_point  the first point the error fails; every point from it on fails
    slot 5  signalled    CLOCK_MONOTONIC nanoseconds of the latest signal (or of the failure)

A writer stores ``error_point`` and ``error`` before ``value``, and a reader loads ``value``
before ``error``: on x86 and with acquire/release elsewhere, a reader that sees a value also
sees an error stored with it. A point is *signalled* once ``value`` reaches it, *failed* if the
timeline has an error and the point is at or past ``error_point`` (whatever the value), and
*pending* otherwise. That is dma_fence's model: a fence signals once, and may carry an error.

``kick`` is the one system call of the recipe (the eventfd write after a store); it is here so
that every side writes it the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os

from ._errors import BrokerError

__all__ = [
    "MAGIC",
    "PAGE_BYTES",
    "PENDING",
    "SIGNALLED",
    "Page",
    "check",
    "error",
    "error_point",
    "fail",
    "init",
    "kick",
    "point_status",
    "promise",
    "promised",
    "signal",
    "signalled_at",
    "value",
]

PAGE_BYTES = 4096
MAGIC = 0x0001_6C74_6262  # "bbtl", layout 1
PENDING = 0
SIGNALLED = 1

_MAGIC, _VALUE, _PROMISED, _ERROR, _ERROR_POINT, _TIME = range(6)

Page = memoryview
"""A page cast to unsigned 64-bit slots (``memoryview(mmap).cast("Q")``)."""


def init(page: Page) -> None:
    page[_MAGIC] = MAGIC


def value(page: Page) -> int:
    return int(page[_VALUE])


def promised(page: Page) -> int:
    return int(page[_PROMISED])


def error(page: Page) -> int:
    """The timeline's errno, 0 if none (read after ``value``, see the module's docstring)."""
    return int(page[_ERROR])


def error_point(page: Page) -> int:
    return int(page[_ERROR_POINT])


def signalled_at(page: Page) -> int:
    return int(page[_TIME])


def point_status(page: Page, point: int) -> int:
    """1 signalled, 0 pending, or ``-errno`` failed (sync_file's status of one fence)."""
    reached = page[_VALUE] >= point
    err = page[_ERROR]
    if err and point >= page[_ERROR_POINT]:
        return -int(err)
    return SIGNALLED if reached else PENDING


def check(page: Page) -> None:
    if page[_MAGIC] != MAGIC:
        raise BrokerError(errno.EPROTO, "the timeline page has an unknown layout")


def signal(page: Page, point: int, err: int, now_ns: int) -> None:
    """Advance to ``point`` (EINVAL unless it is above the value), failing it with ``err`` if set."""
    current = int(page[_VALUE])
    if point <= current:
        raise BrokerError(errno.EINVAL, f"point {point} is not above the timeline's value {current}")
    if err < 0 or err > 4095:
        raise BrokerError(errno.EINVAL, f"{err} is not an errno")
    page[_TIME] = now_ns
    if err and not page[_ERROR]:
        page[_ERROR_POINT] = point
        page[_ERROR] = err
    page[_VALUE] = point


def fail(page: Page, err: int, now_ns: int) -> bool:
    """Fail every point not yet reached with ``err`` (the broker's poison); False if already failed."""
    if page[_ERROR]:
        return False
    page[_TIME] = now_ns
    page[_ERROR_POINT] = page[_VALUE] + 1
    page[_ERROR] = err
    return True


def promise(page: Page, point: int) -> bool:
    """Record that a fence was made for ``point``; True if it is a new highest promise."""
    if point <= page[_PROMISED]:
        return False
    page[_PROMISED] = point
    return True


def kick(eventfd: int) -> None:
    """Wake every waiter of a timeline: one eventfd write, edge-triggered in each waiter's epoll.

    A counter that some holder filled to its maximum would refuse the write (EAGAIN) and
    wake nobody: it is read back to zero, which only the writer's next write needs.
    """
    try:
        os.eventfd_write(eventfd, 1)
    except BlockingIOError:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(eventfd)
        os.eventfd_write(eventfd, 1)
