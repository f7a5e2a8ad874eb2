"""Socket activation through the real systemd-socket-activate: the broker starts on first connect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bufbroker

MAIN = "from bufbroker.broker._main import main; raise SystemExit(main())"


def test_first_connect_starts_the_broker_on_the_passed_socket(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    log = (tmp_path / "log").open("w")
    activator = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--seqpacket",
            "-l",
            str(path),
            sys.executable,
            "-c",
            MAIN,
            "--socket",
            str(tmp_path / "unused.sock"),
        ],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert time.monotonic() < deadline and activator.poll() is None
            time.sleep(0.02)
        with bufbroker.connect("first", socket=str(path)) as dev:
            buf = dev.allocate(4096, name="activated")
            assert dev.stats()["pid"] == activator.pid  # exec'd in place, on the inherited socket
            assert [b["name"] for b in dev.buffers()] == [buf.name]
        assert not (tmp_path / "unused.sock").exists()  # it did not bind a socket of its own
        os.kill(activator.pid, signal.SIGTERM)
        assert activator.wait(10) == 0
        assert path.exists()  # the socket belongs to whoever made it, not to the broker
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
        log.close()
    assert "listening on the activation socket" in (tmp_path / "log").read_text()
