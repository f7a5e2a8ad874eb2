"""(e) Heaps: the first touch of a fresh buffer's pages, on hugetlb against memfd.

A client allocates a buffer, maps it BIDIRECTIONAL and writes one byte in every 4 KiB page.
Two figures per heap: the touch alone (the map's reply already in hand), and map + touch, since
the hugetlb heap takes and zeroes its huge pages before it answers the map (so that a short pool
is ENOMEM there, not a SIGBUS at the touch), while memfd pages fault in one by one at the touch.

Huge pages must be reserved by root (/proc/sys/vm/nr_hugepages); the benchmark reserves what
it needs and puts the pool back as it was. Not root, or no huge pages: memfd rows only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import bufbroker
from bufbroker import Direction

from ._harness import Row, Settings, against, broker, interleave, summarize

_POOL = Path("/proc/sys/vm/nr_hugepages")
_HUGE = 2 << 20
_STEP = 4096


@contextmanager
def _huge_pages(pages: int) -> Iterator[bool]:
    """``pages`` more huge pages reserved for the run (root only); yields whether it worked."""
    try:
        before = int(_POOL.read_text())
        _POOL.write_text(str(before + pages))
    except OSError:
        yield False
        return
    try:
        yield int(_POOL.read_text()) >= before + pages
    finally:
        _POOL.write_text(str(before))


def _touch(memory: memoryview) -> None:
    for offset in range(0, len(memory), _STEP):
        memory[offset] = 1


def run(settings: Settings) -> list[Row]:
    size = settings.n(64 << 20, 4 << 20)
    label = f"{size >> 20} MiB"
    rounds, warmup = settings.n(30, 3), settings.n(3, 1)
    with (
        _huge_pages(2 * size // _HUGE) as have_huge,
        broker() as b,
        bufbroker.connect("bench-heaps", socket=b.socket) as dev,
    ):

        def first_touch(heap: str, with_map: bool) -> Callable[[], float]:
            def once() -> float:
                buf = dev.allocate(size, heap=heap)
                att = buf.attach()
                start = time.perf_counter()
                m = att.map(Direction.BIDIRECTIONAL)
                if not with_map:
                    start = time.perf_counter()
                _touch(m.memory)
                elapsed = (time.perf_counter() - start) * 1000
                m.unmap()
                att.detach()
                buf.close()
                dev.ping()  # the broker has taken the release before the next case starts
                return elapsed

            return once

        heaps = ["memfd", "hugetlb"] if have_huge else ["memfd"]
        cases = {
            f"{heap}{' map +' if with_map else ''} touch": first_touch(heap, with_map)
            for heap in heaps
            for with_map in (False, True)
        }
        samples = interleave(cases, rounds, warmup)
    rows = {case: summarize("heaps", case, label, values, unit="ms") for case, values in samples.items()}
    for heap in heaps[1:]:
        against(rows[f"{heap} touch"], rows["memfd touch"])
        against(rows[f"{heap} map + touch"], rows["memfd map + touch"])
    if not have_huge:
        rows["memfd touch"].note = "no hugetlb rows: reserving huge pages needs root"
    return list(rows.values())
