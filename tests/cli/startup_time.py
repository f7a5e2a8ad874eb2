"""How long ``bufbroker ls`` takes, against a bare interpreter, in one run on this machine.

    python tests/cli/startup_time.py [RUNS]

Starts a bufbrokerd on a temporary socket with a few buffers in it, then runs ``python -c pass``
and ``bufbroker ls`` (the installed entry point) alternately RUNS times each (default 30), and
prints the medians. Alternating puts both under the same machine load; the median ignores the
odd run a busy neighbour slowed down. docs/CLI.md records the figure.
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bufbroker


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def _start_broker(path: str) -> subprocess.Popen[bytes]:
    broker = subprocess.Popen(
        [str(Path(sys.executable).parent / "bufbrokerd"), "--socket", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if broker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bufbrokerd did not start")
        time.sleep(0.02)
    return broker


def main(runs: int = 30) -> None:
    # Byte-compiled, as pip leaves an installed package; from a checkout, with
    # PYTHONDONTWRITEBYTECODE set, every run would compile the modules from source.
    compileall.compile_dir(Path(bufbroker.__file__).parent, quiet=1)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "bufbroker.sock")
        broker = _start_broker(path)
        try:
            with bufbroker.connect("startup-time", socket=path) as dev:
                held = [dev.allocate(1 << 20, name=f"frame-{i}") for i in range(8)]
                env = {**os.environ, "BUFBROKER_SOCKET": path}
                bare = [sys.executable, "-c", "pass"]
                ls = [str(Path(sys.executable).parent / "bufbroker"), "ls"]
                _time(bare, env), _time(ls, env)  # warm the page cache
                times: dict[str, list[float]] = {"python -c pass": [], "bufbroker ls": []}
                for _ in range(runs):
                    times["python -c pass"].append(_time(bare, env))
                    times["bufbroker ls"].append(_time(ls, env))
                del held
        finally:
            broker.terminate()
            broker.wait()
    print(f"{runs} runs each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for name, samples in times.items():
        print(
            f"{name:16} median {statistics.median(samples) * 1000:6.1f} ms   "
            f"min {min(samples) * 1000:6.1f} ms   max {max(samples) * 1000:6.1f} ms"
        )
    ls, bare = statistics.median(times["bufbroker ls"]), statistics.median(times["python -c pass"])
    print(f"bufbroker ls costs {(ls - bare) * 1000:.1f} ms more than a bare interpreter: {ls / bare:.2f}x")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
