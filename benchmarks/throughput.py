"""(c) Aggregate round trips per second with 1, 16 and 64 client processes, against the bare
trio server with as many clients. Both servers run on the same 2 cores as their clients.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import Row, Settings, _wait_for_socket, broker, spawn


def _aggregate(kind: str, path: str, clients: int, seconds: float) -> float:
    start = time.perf_counter() + 1.0 + clients * 0.05  # everyone connected before the clock runs
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks._workers", "load", kind, path, str(seconds), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for _ in range(clients)
    ]
    total = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        total += int(out.strip() or 0)
    return total / seconds


def run(settings: Settings) -> list[Row]:
    rows: list[Row] = []
    seconds = 0.3 if settings.quick else 3.0
    counts = (1, 2) if settings.quick else (1, 16, 64)
    with tempfile.TemporaryDirectory(prefix="bufbroker-bench-") as directory:
        bare_path = str(Path(directory) / "bare.sock")
        with broker() as b, spawn("trio-server", bare_path) as server:
            _wait_for_socket(bare_path, server)
            for clients in counts:
                # interleaved: bare, broker, bare, broker; the median of each pair of runs
                ours: list[float] = []
                floor: list[float] = []
                for _ in range(1 if settings.quick else 2):
                    floor.append(_aggregate("bare", bare_path, clients, seconds))
                    ours.append(_aggregate("broker", b.socket, clients, seconds))
                mine, base = statistics.median(ours), statistics.median(floor)
                note = "runs' median; p99 column: the slowest run"
                rows.append(
                    Row(
                        "throughput",
                        "broker ping",
                        f"{clients} clients",
                        "ops/s",
                        mine,
                        min(ours),
                        baseline="bare trio server",
                        ratio=mine / base,
                        samples=len(ours),
                        note=note,
                    )
                )
                rows.append(
                    Row(
                        "throughput",
                        "bare trio server",
                        f"{clients} clients",
                        "ops/s",
                        base,
                        min(floor),
                        samples=len(floor),
                        note=note,
                    )
                )
    return rows
