"""Every benchmark group runs, in its quick mode: tiny sizes, few iterations, no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_benchmark_group_produces_rows() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    groups = {row["group"] for row in rows}
    assert groups == {
        *("hand-off", "round trip", "throughput", "scale", "memory"),
        *("fences", "stream", "flight", "heaps"),
    }
    assert all(row["p50"] > 0 for row in rows)
    baselines = {row["baseline"] for row in rows if row["ratio"] is not None}
    assert baselines >= {
        "bare memfd",
        "bare trio server",
        "raw TCP copy",
        "eventfd ping-pong",
        "eventfd ping-pong, trio",
        "bare ring + eventfd",
    }
