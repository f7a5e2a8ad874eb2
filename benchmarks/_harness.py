"""Timing, interleaving, percentiles, output; and the broker and child processes benchmarks use."""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "Row",
    "Settings",
    "broker",
    "interleave",
    "raise_nofile",
    "render",
    "rss_kib",
    "spawn",
    "summarize",
]

MAIN = "from bufbroker.broker._main import main; raise SystemExit(main())"


@dataclass(frozen=True)
class Settings:
    quick: bool = False

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Row:
    group: str
    case: str
    param: str
    unit: str
    p50: float
    p99: float
    baseline: str = ""
    ratio: float | None = None
    samples: int = 0
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def summarize(group: str, case: str, param: str, samples: Sequence[float], unit: str = "µs") -> Row:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Row(group, case, param, unit, statistics.median(ordered), p99, samples=len(ordered))


def against(row: Row, baseline: Row, *, higher_is_better: bool = False) -> Row:
    """``row`` with its ratio to ``baseline`` (case / baseline; for rates, baseline / case)."""
    row.baseline = baseline.case
    row.ratio = baseline.p50 / row.p50 if higher_is_better else row.p50 / baseline.p50
    return row


def interleave(cases: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run each case once per round, in a rotating order, so that drift hits all alike."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            value = cases[name]()
            if r >= warmup:
                samples[name].append(value)
    return samples


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Broker:
    socket: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def broker(*flags: str) -> Iterator[Broker]:
    """A real bufbrokerd on a temporary socket, stopped (by pid) on the way out."""
    with tempfile.TemporaryDirectory(prefix="bufbroker-bench-") as directory:
        path = str(Path(directory) / "bufbroker.sock")
        proc = subprocess.Popen(
            [sys.executable, "-c", MAIN, "--socket", path, "--log-level", "warning", *flags],
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_socket(path, proc)
            yield Broker(path, proc)
        finally:
            _stop(proc)


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.02)
        finally:
            probe.close()


@contextmanager
def spawn(
    role: str, *args: str, pass_fds: Sequence[int] = (), module: str = "benchmarks._workers"
) -> Iterator[subprocess.Popen[bytes]]:
    """A child running ``MODULE ROLE ARGS``, stopped (by pid) on the way out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, role, *args],
        pass_fds=tuple(pass_fds),
        cwd=Path(__file__).parent.parent,
    )
    try:
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers: always by pid, never by name."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def render(rows: Sequence[Row], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(r) for r in rows], indent=2)
    lines = [
        "| group | case | size / param | p50 | p99 | baseline | ratio | note |",
        "|---|---|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        lines.append(
            f"| {r.group} | {r.case} | {r.param} | {_fmt(r.p50)} {r.unit} | {_fmt(r.p99)} {r.unit} "
            f"| {r.baseline} | {ratio} | {r.note} |"
        )
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def machine() -> str:
    return f"{os.cpu_count()} CPUs, Linux {os.uname().release}, Python {sys.version.split()[0]}"
