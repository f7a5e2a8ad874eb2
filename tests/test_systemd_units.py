"""The shipped systemd units: systemd-analyze verifies them silently and rates the service SAFE."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

UNITS = files("bufbroker") / "units"


def _bufbrokerd() -> str:
    return shutil.which("bufbrokerd") or str(Path(sys.executable).with_name("bufbrokerd"))


def install(directory: Path, *, user: bool, watchdog: str | None = None) -> None:
    """Copy the units (system or user) to ``directory`` with ExecStart pointing at this install."""
    source = UNITS / "user" if user else UNITS
    for name in ("bufbroker.socket", "bufbroker.service"):
        text = (source / name).read_text().replace("/usr/bin/bufbrokerd", _bufbrokerd())
        if watchdog is not None:
            text = text.replace("WatchdogSec=30s", f"WatchdogSec={watchdog}")
        (directory / name).write_text(text)


def test_units_are_shipped_as_package_data() -> None:
    for path in ("bufbroker.socket", "bufbroker.service", "user/bufbroker.socket", "user/bufbroker.service"):
        assert (UNITS / path).is_file(), path


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_verify_prints_nothing(tmp_path: Path, user: bool) -> None:
    install(tmp_path, user=user)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "bufbroker.socket", "bufbroker.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even on unknown keys: any output at all is a finding.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_service_is_rated_safe(tmp_path: Path) -> None:
    install(tmp_path, user=False)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", "bufbroker.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert overall and "SAFE" in overall[0], result.stdout[-2000:]
