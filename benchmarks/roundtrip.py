"""(b) One broker round trip, against the floors: a bare trio SOCK_SEQPACKET request/response
server speaking the same message shape (the floor of this stack), and a blocking socketpair
ping-pong between two processes (the floor of Python). And the same attach+map+unmap+detach
when an exporter (a blocking client's own thread, here) supplies the memory, against the
broker's own heap: what forwarding a call and checking its memfd cost.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bufbroker
from bufbroker import Direction

from ._harness import Row, Settings, _wait_for_socket, against, broker, interleave, spawn, summarize
from ._workers import bare_round_trip

BLOCK = 100  # operations per sample: one sample is the mean of a block, the block is what we time


def timed(op: Callable[[], object], block: int = BLOCK) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        for _ in range(block):
            op()
        return (time.perf_counter() - start) / block * 1e6

    return sample


class _Exporter(bufbroker.Exporter):
    """Answers every map with one sealed memfd, as an exporter that has its memory at hand."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("bench-exporter", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, 4096)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)

    def map(self, attachment: bufbroker.ExporterAttachment, direction: Direction) -> int:
        return self.memfd


def run(settings: Settings) -> list[Row]:
    rounds = settings.n(200, 10)
    with tempfile.TemporaryDirectory(prefix="bufbroker-bench-") as directory:
        bare_path = str(Path(directory) / "bare.sock")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with (
            broker() as b,
            spawn("trio-server", bare_path) as server,
            spawn("echo", str(theirs.fileno()), pass_fds=[theirs.fileno()]),
        ):
            theirs.close()
            _wait_for_socket(bare_path, server)
            bare = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            bare.connect(bare_path)
            exporter = _Exporter()
            with (
                bufbroker.connect("bench", socket=b.socket) as dev,
                bufbroker.connect("bench-exporter", socket=b.socket, exporter=exporter) as exp,
            ):
                buf = dev.allocate(4096)
                exp.export(4096, name="bench-exported")
                theirs_buf = dev.open("bench-exported")

                def attach_map_unmap_detach(buf: bufbroker.Buffer = buf) -> None:
                    att = buf.attach()
                    att.map(Direction.TO_DEVICE).unmap()
                    att.detach()

                def ping_pong() -> None:
                    ours.send(b"x")
                    ours.recv(16)

                samples = interleave(
                    {
                        "broker ping": timed(dev.ping),
                        "broker attach+map+unmap+detach": timed(attach_map_unmap_detach, BLOCK // 4),
                        "exporter attach+map+unmap+detach": timed(
                            lambda: attach_map_unmap_detach(theirs_buf), BLOCK // 4
                        ),
                        "bare trio server": timed(lambda: bare_round_trip(bare, 1)),
                        "socketpair ping-pong": timed(ping_pong),
                    },
                    rounds=rounds,
                    warmup=settings.n(10, 1),
                )
            bare.close()
            ours.close()
            os.close(exporter.memfd)
    rows = {name: summarize("round trip", name, "1 op", xs) for name, xs in samples.items()}
    floor, python = rows["bare trio server"], rows["socketpair ping-pong"]
    ping = against(rows["broker ping"], floor)
    ping.note = f"{ping.p50 / python.p50:.2f}x the Python floor"
    compound = against(rows["broker attach+map+unmap+detach"], floor)
    compound.note = f"4 round trips: {compound.p50 / 4 / floor.p50:.2f}x the trio floor each"
    forwarded = against(rows["exporter attach+map+unmap+detach"], rows["broker attach+map+unmap+detach"])
    forwarded.note = "attach and map answered by an exporter thread; unmap and detach told to it"
    return [ping, compound, forwarded, floor, against(python, floor)]
