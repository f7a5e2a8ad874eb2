"""A daemon started with a bad config file or flag says what is wrong in one line naming the
file and key, and exits with status 1 (or argparse's 2), never with a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DAEMON = [sys.executable, "-c", "from bufbroker.broker._main import main; raise SystemExit(main())"]


def start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('max_buffers_per_uid = "lots"', "max_buffers_per_uid must be a whole number, not 'lots'"),
        ("max_buffers_per_uid = 1.5", "max_buffers_per_uid must be a whole number, not 1.5"),
        ("max_buffers_per_uid = true", "max_buffers_per_uid must be a whole number, not True"),
        ("max_buffers_per_uid = 0", "max_buffers_per_uid must be positive"),
        ('max_bytes_per_uid = "many"', "max_bytes_per_uid: not a size: 'many'"),
        ("max_bytes_per_uid = 1.5", "max_bytes_per_uid must be a size"),
        ('handshake_timeout = "soon"', "handshake_timeout must be a number of seconds"),
        ("max_buffers_per_uid = = 3", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path: Path, toml: str, says: str) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(toml + "\n")
    out = start("--config", str(path), "--socket", str(tmp_path / "s.sock"))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert str(path) in out.stderr and says in out.stderr, out.stderr


@pytest.mark.parametrize("mode", ["999", "rw", "10000"])
def test_a_bad_socket_mode_says_what_a_mode_is(tmp_path: Path, mode: str) -> None:
    out = start("--socket-mode", mode, "--socket", str(tmp_path / "s.sock"))
    assert out.returncode == 2 and "lambda" not in out.stderr
    assert f"not an octal file mode: {mode!r}" in out.stderr, out.stderr
