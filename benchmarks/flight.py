"""(e) Between two brokers through the Flight service on loopback, against a raw TCP copy.

Two brokers stand for two hosts. ``flight fetch`` copies a named buffer of broker A into a new
buffer of broker B through ``bufbroker-flight`` in front of A; ``flight push`` copies a buffer
of B into a new buffer of A through the same service. The baseline, ``raw TCP copy``, sends the
same bytes from a mapping of the same buffer of A, over one loopback TCP connection, into a new
buffer of B: the bytes a transfer must move, with nothing of gRPC, Arrow or the service. Every
case includes allocating and mapping the new buffer. Rates are MiB/s; the p99 column is the
slowest run. The "4 at once" rows run four of the same transfer at once, from four threads, and
give their aggregate rate.
"""

from __future__ import annotations

import functools
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._harness import Row, Settings, _stop, broker, interleave

MiB = 1 << 20
CASES = {"tcp": "raw TCP copy", "fetch": "flight fetch", "push": "flight push"}
NOTE = "rate: ratio is case/baseline, higher is better; p99 column: slowest run"


def _start(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """A child that prints one line once it is ready, and that line."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        _stop(proc)
        raise RuntimeError(f"{args[1]} did not start")
    return proc, line


@dataclass
class _Cases:
    """One size's three ways of moving the bytes; each returns its rate in MiB/s."""

    a: Any  # bufbroker.Device of broker A (the serving host)
    b: Any  # bufbroker.Device of broker B (the other host)
    location: str
    name: str
    size: int
    port: int
    local: Any  # a buffer of B to push

    def tcp(self) -> float:
        start = time.perf_counter()
        self._tcp()
        return self.size / (time.perf_counter() - start) / MiB

    def _tcp(self, index: int = 0) -> None:
        from bufbroker import Direction

        target = self.b.allocate(self.size)
        with (
            target.attach() as att,
            att.map(Direction.FROM_DEVICE) as m,
            socket.create_connection(("127.0.0.1", self.port)) as conn,
        ):
            view, got = m.memory, 0
            while got < self.size:
                n = conn.recv_into(view[got : self.size])
                if not n:
                    raise RuntimeError("the sender hung up early")
                got += n
            del view
        target.close()

    def fetch(self) -> float:
        start = time.perf_counter()
        self._fetch()
        return self.size / (time.perf_counter() - start) / MiB

    def _fetch(self, index: int = 0) -> None:
        import bufbroker.flight as bf

        bf.fetch(self.location, self.name, device=self.b).close()

    def push(self) -> float:
        import bufbroker.flight as bf

        start = time.perf_counter()
        bf.push(self.location, self.local, name="bench-pushed-0")
        elapsed = time.perf_counter() - start
        bf.drop(self.location, "bench-pushed-0")
        return self.size / elapsed / MiB

    def _push(self, index: int = 0) -> None:
        import bufbroker.flight as bf

        bf.push(self.location, self.local, name=f"bench-pushed-{index}")

    def together(self, transfer: str, n: int = 4) -> float:
        """``n`` transfers at once (threads); their aggregate rate."""
        import bufbroker.flight as bf

        how = {"tcp": self._tcp, "fetch": self._fetch, "push": self._push}[transfer]
        failures: list[BaseException] = []

        def one(index: int) -> None:
            try:
                how(index)
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if failures:
            raise failures[0]
        if transfer == "push":
            for i in range(n):
                bf.drop(self.location, f"bench-pushed-{i}")
        return n * self.size / elapsed / MiB


def _filled(device: Any, size: int, name: str | None = None) -> Any:
    from bufbroker import Access

    buffer = device.allocate(size, name=name)
    with buffer.cpu_access(Access.WRITE) as memory:
        memory[:size] = bytes(range(256)) * (size // 256)
    return buffer


def _rows(param: str, samples: dict[str, list[float]]) -> list[Row]:
    base = statistics.median(samples["tcp"])
    rows = []
    for key, case in CASES.items():
        mine = statistics.median(samples[key])
        baseline = key != "tcp"
        rows.append(
            Row(
                "flight",
                case,
                param,
                "MiB/s",
                mine,
                min(samples[key]),
                baseline=CASES["tcp"] if baseline else "",
                ratio=mine / base if baseline else None,
                samples=len(samples[key]),
                note=NOTE,
            )
        )
    return rows


def _measure(cases: _Cases, settings: Settings) -> list[Row]:
    """One at a time at every size but 64 MiB; at 64 MiB, four at once (the quick run: both)."""
    rounds = settings.n(8 if cases.size <= 16 * MiB else 4, 2)
    param = f"{cases.size >> 20} MiB"
    rows = []
    if cases.size != 64 * MiB or settings.quick:
        one = {key: getattr(cases, key) for key in CASES}
        rows += _rows(param, interleave(one, rounds, warmup=1))
    if cases.size == 64 * MiB or settings.quick:
        four = {key: functools.partial(cases.together, key) for key in CASES}
        rows += _rows(f"{param}, 4 at once", interleave(four, rounds, warmup=1))
    return rows


def run(settings: Settings) -> list[Row]:
    import bufbroker

    sizes = [1 * MiB] if settings.quick else [16 * MiB, 64 * MiB, 256 * MiB]
    rows: list[Row] = []
    with broker() as host_a, broker() as host_b:
        flags = ["--socket", host_a.socket, "--allow", "bench-*", "--allow-write", "bench-*"]
        service, line = _start("-m", "bufbroker.flight", "--listen", "grpc://127.0.0.1:0", *flags)
        try:
            a = bufbroker.connect("bench-a", socket=host_a.socket)
            b = bufbroker.connect("bench-b", socket=host_b.socket)
            with a, b:
                for size in sizes:
                    name = f"bench-{size}"
                    source, local = _filled(a, size, name), _filled(b, size)
                    sender, port = _start("-m", "benchmarks._workers", "tcp-sender", host_a.socket, name)
                    try:
                        rows += _measure(
                            _Cases(a, b, line.split()[-1], name, size, int(port), local), settings
                        )
                    finally:
                        _stop(sender)
                    source.close()
                    local.close()
        finally:
            _stop(service)
    return rows
