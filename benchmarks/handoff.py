"""(a) Hand-off: a producer fills a buffer and hands it to a consumer process, which reads the
first and the last page. Timed from the hand-off to the last page read; allocation and filling
are the same for every case and not part of it.

Baselines: the same bytes copied through a pipe; ``multiprocessing.shared_memory`` (create by
name, attach by name); a bare memfd sent with ``socket.send_fds`` (the floor without a broker).
"""

from __future__ import annotations

import mmap
import os
import socket
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import msgpack

import bufbroker
from bufbroker import Access
from bufbroker.broker._reaper import LARGE
from bufbroker.protocol import ancillary

from ._harness import Row, Settings, against, broker, interleave, spawn, summarize

SIZES = {"4 KiB": 4 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20, "1 GiB": 1 << 30}
QUICK_SIZES = {"4 KiB": 4 << 10, "64 KiB": 64 << 10}
FILL = b"\xa5" * (1 << 20)


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise RuntimeError("no Shmem in /proc/meminfo")


def _wait_freed(before_kib: int, size: int) -> None:
    """Wait until the kernel has freed (nearly) all of a released buffer's ``size`` bytes.

    The broker frees large buffers in a worker thread (so that other clients do not wait);
    that must not overlap the next case's timing, as the consumer's own frees do not.
    """
    deadline = time.monotonic() + 10
    while _shmem_kib() > before_kib - size // 1024 * 99 // 100 and time.monotonic() < deadline:
        time.sleep(0.001)


def _fill(view: memoryview | mmap.mmap, size: int) -> None:
    for offset in range(0, size, len(FILL)):
        n = min(len(FILL), size - offset)
        view[offset : offset + n] = FILL[:n]


def run(settings: Settings) -> list[Row]:
    rows: list[Row] = []
    sizes = QUICK_SIZES if settings.quick else SIZES
    with broker() as b, bufbroker.connect("bench-producer", socket=b.socket) as dev:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with spawn("consumer", str(theirs.fileno()), b.socket, pass_fds=[theirs.fileno()]):
            theirs.close()

            def hand(case: str, size: int, name: str = "", fds: tuple[int, ...] = ()) -> int:
                # A consumer that slept through the fill would add its wake-up (~100 µs on these
                # VMs) to whichever case comes next: wake it first, then start the clock.
                ours.send(b"ready?")
                ours.recv(16)
                start = time.perf_counter_ns()  # CLOCK_MONOTONIC: comparable across processes
                ours.sendmsg([msgpack.packb([case, size, name])], ancillary(fds))
                return start

            def finish(start: int) -> float:
                done: int = msgpack.unpackb(ours.recv(64))
                return (done - start) / 1000

            def via_broker(size: int) -> Callable[[], float]:
                def once() -> float:
                    buf = dev.allocate(size)
                    with buf.cpu_access(Access.WRITE) as mem:
                        _fill(mem, size)
                    handle = buf.share()
                    start = hand("bufbroker", size, fds=(handle,))
                    os.close(handle)
                    elapsed = finish(start)
                    before = _shmem_kib()
                    buf.close()
                    if size >= LARGE:
                        _wait_freed(before, size)
                    return elapsed

                return once

            def via_memfd(size: int) -> Callable[[], float]:
                def once() -> float:
                    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
                    os.ftruncate(fd, size)
                    with mmap.mmap(fd, size) as view:
                        _fill(view, size)
                    start = hand("memfd", size, fds=(fd,))
                    os.close(fd)
                    return finish(start)

                return once

            def via_shared_memory(size: int) -> Callable[[], float]:
                def once() -> float:
                    shm = shared_memory.SharedMemory(create=True, size=size)
                    assert shm.buf is not None
                    _fill(shm.buf, size)
                    start = hand("shared_memory", size, name=shm.name)
                    elapsed = finish(start)
                    shm.close()
                    shm.unlink()
                    return elapsed

                return once

            def via_pipe(size: int) -> Callable[[], float]:
                payload = memoryview(bytearray(FILL * max(1, size // len(FILL)))[:size])

                def once() -> float:
                    r, w = os.pipe()
                    start = hand("pipe", size, fds=(r,))
                    os.close(r)
                    with os.fdopen(w, "wb", buffering=0) as out:
                        out.write(payload)
                    return finish(start)

                return once

            for label, size in sizes.items():
                big = size >= 1 << 30
                rounds = settings.n(8 if big else 60, 5)
                cases = {
                    "bufbroker": via_broker(size),
                    "bare memfd": via_memfd(size),
                    "shared_memory": via_shared_memory(size),
                    "pipe": via_pipe(size),
                }
                samples = interleave(cases, rounds=rounds, warmup=1 if big else settings.n(5, 1))
                results = {name: summarize("hand-off", name, label, xs) for name, xs in samples.items()}
                floor, ours_row, pipe = results["bare memfd"], results["bufbroker"], results["pipe"]
                for name in ("bufbroker", "shared_memory", "pipe"):
                    rows.append(against(results[name], floor))
                ours_row.note = f"the pipe takes {pipe.p50 / ours_row.p50:,.1f}x as long"
                rows.append(floor)
    return rows
