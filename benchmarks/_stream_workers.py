"""Subscribers for the stream benchmarks: ``python -m benchmarks._stream_workers ROLE ARGS``.

Each one receives frames, reads the first and the last page of each (as a consumer checking a
frame would), and answers on its control socket ``CTL_FD`` with 8 bytes: the nanoseconds from
the stamp the publisher wrote into the frame's first 8 bytes (CLOCK_MONOTONIC, just before it
sent) to the moment both pages were read. It stops when the control socket closes.

- ``stream CTL_FD SOCKET NAME``: a bufbroker subscriber, blocking client;
- ``stream-trio CTL_FD SOCKET NAME``: the same from trio;
- ``ring CTL_FD MEMFD EVENTFD SLOTS SIZE``: the floor, a bare ring in a shared memfd whose
  header holds the latest frame's number, woken by an eventfd read;
- ``ring-trio ...``: the same floor in trio (its eventfd awaited with ``wait_readable``);
- ``iceoryx2 CTL_FD SERVICE``: an iceoryx2 subscriber woken by an iceoryx2 event listener.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import sys
import time

PAGE = mmap.PAGESIZE


def _answer(ctl: socket.socket, frame: memoryview) -> bool:
    stamp = int.from_bytes(frame[:8], "little")
    bytes(frame[:PAGE])
    bytes(frame[len(frame) - PAGE :])
    took = time.monotonic_ns() - stamp
    try:
        ctl.send(took.to_bytes(8, "little"))
    except OSError:
        return False
    return True


def stream(ctl_fd: str, path: str, name: str) -> None:
    import bufbroker

    ctl = socket.socket(fileno=int(ctl_fd))
    with bufbroker.connect("bench-subscriber", socket=path) as dev, dev.subscribe(name, timeout=10) as sub:
        ctl.send(b"ready")
        for frame in sub:
            if not _answer(ctl, frame.memory):
                return


def stream_trio(ctl_fd: str, path: str, name: str) -> None:
    import trio

    import bufbroker

    ctl = socket.socket(fileno=int(ctl_fd))

    async def main() -> None:
        async with (
            bufbroker.open_device("bench-subscriber", socket=path) as dev,
            dev.subscribe(name, timeout=10) as sub,
        ):
            ctl.send(b"ready")
            async for frame in sub:
                if not _answer(ctl, frame.memory):
                    return

    trio.run(main)


def ring(ctl_fd: str, memfd: str, eventfd: str, slots: str, size: str) -> None:
    ctl = socket.socket(fileno=int(ctl_fd))
    n, length = int(slots), int(size)
    pool = mmap.mmap(int(memfd), PAGE + n * length, prot=mmap.PROT_READ)
    view = memoryview(pool)
    header = view[:8].cast("Q")
    efd = int(eventfd)
    os.set_blocking(efd, True)
    seen = 0
    ctl.send(b"ready")
    while True:
        os.eventfd_read(efd)
        latest = int(header[0])
        while seen < latest:
            seen += 1
            slot = (seen - 1) % n
            if not _answer(ctl, view[PAGE + slot * length : PAGE + (slot + 1) * length]):
                return


def ring_trio(ctl_fd: str, memfd: str, eventfd: str, slots: str, size: str) -> None:
    """The floor under trio: the same ring, its eventfd awaited through trio's own epoll."""
    import trio

    ctl = socket.socket(fileno=int(ctl_fd))
    n, length = int(slots), int(size)
    pool = mmap.mmap(int(memfd), PAGE + n * length, prot=mmap.PROT_READ)
    view = memoryview(pool)
    header = view[:8].cast("Q")
    efd = int(eventfd)
    os.set_blocking(efd, False)

    async def main() -> None:
        seen = 0
        ctl.send(b"ready")
        while True:
            await trio.lowlevel.wait_readable(efd)
            os.eventfd_read(efd)
            latest = int(header[0])
            while seen < latest:
                seen += 1
                slot = (seen - 1) % n
                if not _answer(ctl, view[PAGE + slot * length : PAGE + (slot + 1) * length]):
                    return

    trio.run(main)


def iceoryx2(ctl_fd: str, service: str) -> None:
    import iceoryx2 as iox2

    ctl = socket.socket(fileno=int(ctl_fd))
    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    name = iox2.ServiceName.new(service)
    pubsub = node.service_builder(name).publish_subscribe(iox2.Slice[ctypes.c_uint8]).open_or_create()
    event = node.service_builder(name).event().open_or_create()
    subscriber = pubsub.subscriber_builder().create()
    listener = event.listener_builder().create()
    ctl.send(b"ready")
    while True:
        listener.blocking_wait()
        while (sample := subscriber.receive()) is not None:
            ok = _answer(ctl, sample.payload().as_memory_view().cast("B"))
            del sample
            if not ok:
                return


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles = {"stream": stream, "stream-trio": stream_trio, "ring": ring, "ring-trio": ring_trio}
    {**roles, "iceoryx2": iceoryx2}[role](*args)
