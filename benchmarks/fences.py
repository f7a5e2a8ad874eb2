"""(g) A timeline's signal → wake-up round trip between two processes, against a bare eventfd
ping-pong in the same run: blocking, and awaited in trio.

One round: this process signals point i of its timeline; the other, waiting on it, wakes and
signals point i of its own; this process wakes. The floor does the same with two eventfds and
nothing else: a blocking read, or (trio) a wait for readability then a read. The broker is not
in the path of either.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

import bufbroker

from ._harness import Row, Settings, against, broker, interleave, spawn, summarize

BLOCK = 200  # round trips per sample


@contextmanager
def _eventfd_peer(nonblocking: bool) -> Iterator[tuple[int, int]]:
    """Two eventfds (to the peer, from it) and a peer echoing between them."""
    to_peer, from_peer = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK if nonblocking else 0)
    try:
        with spawn("eventfd-echo", str(to_peer), str(from_peer), pass_fds=[to_peer, from_peer]):
            yield to_peer, from_peer
    finally:
        os.close(to_peer)
        os.close(from_peer)


def _eventfd_blocking(to_peer: int, from_peer: int) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        for _ in range(BLOCK):
            os.eventfd_write(to_peer, 1)
            os.eventfd_read(from_peer)
        return (time.perf_counter() - start) / BLOCK * 1e6

    return sample


def _eventfd_trio(to_peer: int, from_peer: int) -> Callable[[], float]:
    async def rounds() -> float:
        start = time.perf_counter()
        for _ in range(BLOCK):
            os.eventfd_write(to_peer, 1)
            while True:
                try:
                    os.eventfd_read(from_peer)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(from_peer)
        return (time.perf_counter() - start) / BLOCK * 1e6

    return lambda: trio.run(rounds)


class _Rounds:
    """The point both timelines are at: every case goes on from where the last one stopped."""

    def __init__(self) -> None:
        self.point = 0


def _timeline_blocking(
    mine: bufbroker.Timeline, theirs: bufbroker.Timeline, at: _Rounds
) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        for _ in range(BLOCK):
            at.point += 1
            mine.signal(at.point)
            theirs.wait(at.point)
        return (time.perf_counter() - start) / BLOCK * 1e6

    return sample


def _timeline_trio(path: str, mine: bufbroker.Timeline, handle: int, at: _Rounds) -> Callable[[], float]:
    async def rounds() -> float:
        async with bufbroker.open_device("bench-trio", socket=path) as dev:
            theirs = await dev.import_timeline(handle)
            start = time.perf_counter()
            for _ in range(BLOCK):
                at.point += 1
                mine.signal(at.point)  # a signal is a store and a write: the same in trio
                await theirs.wait(at.point)
            return (time.perf_counter() - start) / BLOCK * 1e6

    return lambda: trio.run(rounds)


def run(settings: Settings) -> list[Row]:
    rounds = settings.n(150, 4)
    ours, theirs_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with broker() as b, bufbroker.connect("bench", socket=b.socket) as dev:
        mine = dev.timeline(name="bench")
        with (
            spawn("timeline-echo", str(theirs_end.fileno()), b.socket, pass_fds=[theirs_end.fileno()]),
            _eventfd_peer(False) as plain,
            _eventfd_peer(True) as awaited,
        ):
            theirs_end.close()
            handle = mine.share()
            bufbroker.send_handle(ours, handle)
            os.close(handle)
            handle = bufbroker.recv_handle(ours)
            theirs = dev.import_timeline(handle)
            at = _Rounds()
            samples = interleave(
                {
                    "eventfd ping-pong": _eventfd_blocking(*plain),
                    "timeline signal -> wake": _timeline_blocking(mine, theirs, at),
                    "eventfd ping-pong, trio": _eventfd_trio(*awaited),
                    "timeline signal -> wake, trio": _timeline_trio(b.socket, mine, handle, at),
                },
                rounds=rounds,
                warmup=settings.n(5, 1),
            )
            os.close(handle)
    ours.close()
    rows = {name: summarize("fences", name, "1 round trip", xs) for name, xs in samples.items()}
    blocking = against(rows["timeline signal -> wake"], rows["eventfd ping-pong"])
    awaited_row = against(rows["timeline signal -> wake, trio"], rows["eventfd ping-pong, trio"])
    for row in (blocking, awaited_row):
        row.note = "target <= 1.5x"
    return [blocking, rows["eventfd ping-pong"], awaited_row, rows["eventfd ping-pong, trio"]]
