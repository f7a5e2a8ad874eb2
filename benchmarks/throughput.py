"""(c) Aggregate round trips per second with 1, 16 and 64 client processes, against the bare
trio server with as many clients. Both servers run on the same 2 cores as their clients.

A third case drives the broker with the floor's own client (msgpack and a bare send/recv, once
registered): what our client library costs shows as the gap between it and ``broker ping``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import Row, Settings, _wait_for_socket, broker, spawn

CASES = {  # load kind -> the case's name, in the table's order
    "broker": "broker ping",
    "broker-bare-client": "broker ping, the floor's client",
    "bare": "bare trio server",
}


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
                # interleaved: bare, broker, broker with the bare client, and again; each case's
                # median run
                runs: dict[str, list[float]] = {"bare": [], "broker": [], "broker-bare-client": []}
                for _ in range(1 if settings.quick else 2):
                    for kind, runs_of_kind in runs.items():
                        path = bare_path if kind == "bare" else b.socket
                        runs_of_kind.append(_aggregate(kind, path, clients, seconds))
                base = statistics.median(runs["bare"])
                note = "runs' median; p99 column: the slowest run"
                for kind, case in CASES.items():
                    mine = statistics.median(runs[kind])
                    rows.append(
                        Row(
                            "throughput",
                            case,
                            f"{clients} clients",
                            "ops/s",
                            mine,
                            min(runs[kind]),
                            baseline="bare trio server" if kind != "bare" else "",
                            ratio=mine / base if kind != "bare" else None,
                            samples=len(runs[kind]),
                            note=note,
                        )
                    )
    return rows
