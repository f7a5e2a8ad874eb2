"""What the reliability drivers share: a broker to aim at, and its descriptors and memory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bufbroker

MAIN = "from bufbroker.broker._main import main; raise SystemExit(main())"


@dataclass(frozen=True)
class Target:
    socket: str
    pid: int

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def settle(self, fds: int, timeout: float = 15.0) -> int:
        """Wait until the broker is back to ``fds`` descriptors (closes arrive asynchronously)."""
        deadline = time.monotonic() + timeout
        while (now := self.fds()) > fds and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    def devices(self) -> list[dict[str, object]]:
        with bufbroker.connect("observer", socket=self.socket) as dev:
            return [d for d in dev.devices() if d["name"] != "observer"]


@contextmanager
def own_broker(*flags: str) -> Iterator[Target]:
    """A bufbrokerd of our own for the long modes, stopped by pid on the way out."""
    with tempfile.TemporaryDirectory(prefix="bufbroker-tool-") as directory:
        os.chmod(directory, 0o755)
        path = str(Path(directory) / "bufbroker.sock")
        proc = subprocess.Popen(
            [sys.executable, "-c", MAIN, "--socket", path, "--log-level", "error", *flags]
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bufbrokerd did not start")
                time.sleep(0.02)
            time.sleep(0.1)
            yield Target(path, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
