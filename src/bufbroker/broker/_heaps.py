"""Heaps: where a buffer's memory comes from, as dma-buf heaps (system, cma, ...) are.

* ``memfd`` (the default): a sealed memfd of 4 KiB pages, faulted in as it is touched.
* ``hugetlb``: a memfd of 2 MiB huge pages from the system's pool. Sizes are rounded to whole
  huge pages, and the pages are allocated (fallocate) before any client maps them: a short pool
  is ENOMEM in the reply to map or cpu access, never a SIGBUS in a client at its first touch.
  Where the pool is empty and may not grow, allocate is ENODEV (like a missing heap).
* ``shm``: named POSIX shared memory (``_shm``), which outlives the broker.

A heap knows its page size, whether it is available, and how to make a buffer's backing; the
state model asks it for backing at the first map or cpu access (late allocation).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, ClassVar

from ..protocol import PAGE_SIZE, BrokerError
from ._heap import Backing, allocate_memfd
from ._records import Buffer

__all__ = ["HUGE_PAGE", "Heap", "HugetlbHeap", "MemfdHeap", "commit"]

HUGE_PAGE = 2 << 20
_POOL = "/sys/kernel/mm/hugepages/hugepages-2048kB"


class Heap:
    """One allocator. Subclasses set the class attributes and ``allocate``."""

    name: ClassVar[str]
    page_size: ClassVar[int] = PAGE_SIZE
    sealable: ClassVar[bool] = True  # whether the kernel can seal its backing (memfd seals)
    # Whether a uid other than the owner may get writable descriptors: not where the kernel
    # cannot forbid ftruncate to holders of one (POSIX shm: a shrink SIGBUSes other mappers).
    shared_writers: ClassVar[bool] = True
    # Whether its memory must be committed (off the loop) before a client maps it: where a page
    # that cannot be had at a fault would be a SIGBUS (huge pages, a full tmpfs).
    commits: ClassVar[bool] = False

    def span(self, size: int) -> int:
        """The backing's length for a buffer of ``size`` bytes: whole pages of this heap."""
        return -(-size // self.page_size) * self.page_size

    def unavailable(self) -> str | None:
        """Why this heap cannot allocate on this system, or None."""
        return None

    def check(self) -> None:
        if reason := self.unavailable():
            raise BrokerError(errno.ENODEV, f"the {self.name} heap is unavailable: {reason}")

    def allocate(self, buffer: Buffer) -> Backing:
        raise NotImplementedError

    def pool(self) -> dict[str, Any]:
        """What the heap draws from, for ``heaps`` (empty where there is nothing to say)."""
        return {}

    def short(self, span: int) -> str:
        """Why committing ``span`` bytes failed with ENOSPC, and what to do."""
        return f"{span} bytes cannot be committed"


class MemfdHeap(Heap):
    name = "memfd"

    def allocate(self, buffer: Buffer) -> Backing:
        return allocate_memfd(buffer.span, buffer.name or str(buffer.id), sealable=buffer.sealable)


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


class HugetlbHeap(Heap):
    name = "hugetlb"
    page_size = HUGE_PAGE
    commits = True

    def _counts(self) -> dict[str, int] | None:
        try:
            return {
                key: _read_int(f"{_POOL}/{key}_hugepages")
                for key in ("nr", "free", "resv", "surplus", "nr_overcommit")
            }
        except (OSError, ValueError):
            return None

    def unavailable(self) -> str | None:
        counts = self._counts()
        if counts is None:
            return "this kernel has no 2 MiB huge pages"
        if counts["nr"] == 0 and counts["nr_overcommit"] == 0:
            return "no 2 MiB huge pages are reserved (root sets /proc/sys/vm/nr_hugepages)"
        return None

    def allocate(self, buffer: Buffer) -> Backing:
        self.check()
        return allocate_memfd(buffer.span, buffer.name or str(buffer.id), huge=True, sealable=buffer.sealable)

    def pool(self) -> dict[str, Any]:
        counts = self._counts() or {}
        return {
            "pages": counts.get("nr", 0),
            "free_pages": counts.get("free", 0) - counts.get("resv", 0),
            "overcommit_pages": counts.get("nr_overcommit", 0),
        }

    def short(self, span: int) -> str:
        free = self.pool()["free_pages"]
        return (
            f"the huge page pool is short: {span // HUGE_PAGE} pages of 2 MiB wanted, {free} free "
            "(root raises /proc/sys/vm/nr_hugepages)"
        )


def commit(heap: Heap, backing: Backing) -> Callable[[], None]:
    """A call that commits ``backing``'s memory, to run in a worker thread.

    fallocate on a huge page memfd or a tmpfs file allocates (and zeroes) every page, which takes
    a while for large buffers: never on the event loop. It works on a duplicate of the
    descriptor, so that a buffer freed meanwhile cannot hand the thread a reused descriptor.
    """
    fd, size = os.dup(backing.fd), backing.size

    def run() -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise BrokerError(errno.ENOMEM, heap.short(size)) from None
            raise BrokerError(e.errno or errno.EIO, f"cannot commit the backing: {e.strerror}") from None
        finally:
            os.close(fd)

    return run
