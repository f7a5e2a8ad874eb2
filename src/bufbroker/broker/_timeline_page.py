"""A timeline's shared memory and its eventfd, as the broker makes and keeps them.

The page is a sealed 4 KiB memfd (mode 0400, like every backing: a process of another uid
cannot reopen a read-only descriptor for writing); the signaller gets it read-write, every
other holder read-only, and everybody the one eventfd. The broker writes the page only to
record a promise and to fail a timeline (the signaller died, or a promise went unkept), and
writes the eventfd after it does, as a signaller does.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time

from ..protocol import BrokerError
from ..protocol import timeline as page

__all__ = ["TimelinePage"]

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class TimelinePage:
    """One timeline's page (mapped here, read-write) and eventfd, owned by the broker."""

    __slots__ = ("_map", "eventfd", "fd", "slots")

    def __init__(self, fd: int, eventfd: int) -> None:
        self.fd = fd
        self.eventfd = eventfd
        self._map = mmap.mmap(fd, page.PAGE_BYTES)
        self.slots: page.Page = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, label: str) -> TimelinePage:
        fd = os.memfd_create(f"bufbroker-timeline:{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        efd = -1
        try:
            os.ftruncate(fd, page.PAGE_BYTES)
            os.fchmod(fd, 0o400)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            made = cls(fd, efd)
        except OSError as e:
            os.close(fd)
            if efd >= 0:
                os.close(efd)
            raise BrokerError(e.errno or errno.ENOMEM, f"cannot create a timeline: {e.strerror}") from None
        page.init(made.slots)
        return made

    @classmethod
    def adopt(cls, fd: int, eventfd: int) -> TimelinePage:
        """A page and eventfd kept across a restart (the fd store); checked before use."""
        made = cls(fd, eventfd)
        page.check(made.slots)
        return made

    def descriptors(self, writable: bool) -> list[int]:
        """The page (read-write only for the signaller) and the eventfd, for one client."""
        mem = os.dup(self.fd) if writable else os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [mem, os.dup(self.eventfd)]
        except OSError:
            os.close(mem)
            raise

    def status(self, point: int) -> int:
        return page.point_status(self.slots, point)

    @property
    def value(self) -> int:
        return page.value(self.slots)

    @property
    def promised(self) -> int:
        return page.promised(self.slots)

    @property
    def signalled_at(self) -> int:
        return page.signalled_at(self.slots)

    def fail(self, err: int) -> bool:
        """Fail every point not yet reached with ``err``; False if the timeline had failed already.

        The caller wakes everyone (``kick``), off the loop: any holder of the eventfd can make
        a write to it block (clear O_NONBLOCK on the shared file, fill the counter).
        """
        return page.fail(self.slots, err, time.monotonic_ns())

    def kick(self) -> None:
        """Wake every waiter (may block, see ``fail``: call it from a worker thread)."""
        if self.eventfd >= 0:
            page.kick(self.eventfd)

    def promise(self, point: int) -> None:
        page.promise(self.slots, point)

    def close(self) -> None:
        if self.fd >= 0:
            self.slots.release()
            self._map.close()
            os.close(self.fd)
            os.close(self.eventfd)
            self.fd = self.eventfd = -1
