"""``bufbroker install-units``: the shipped systemd units, pointed at this installation."""

from __future__ import annotations

import shutil
import sys
from importlib.resources import files
from pathlib import Path

__all__ = ["install_units"]

UNITS = ("bufbroker.socket", "bufbroker.service")


def _bufbrokerd() -> str:
    """The absolute path of this installation's bufbrokerd (beside this Python, or on PATH)."""
    beside = Path(sys.executable).with_name("bufbrokerd")
    if beside.exists():
        return str(beside.absolute())
    found = shutil.which("bufbrokerd")
    if found is None:
        raise FileNotFoundError("bufbrokerd is not installed beside this Python nor on PATH")
    return str(Path(found).absolute())


def install_units(*, user: bool, dest: Path | None) -> list[str]:
    """Write the units; returns the lines to print (what was written, what to run next)."""
    source = files("bufbroker") / "units"
    if user:
        source = source / "user"
    target = dest or (Path.home() / ".config/systemd/user" if user else Path("/etc/systemd/system"))
    target.mkdir(parents=True, exist_ok=True)
    daemon = _bufbrokerd()
    lines = []
    for name in UNITS:
        text = (source / name).read_text().replace("ExecStart=/usr/bin/bufbrokerd", f"ExecStart={daemon}")
        (target / name).write_text(text)
        lines.append(f"wrote {target / name}")
    systemctl = "systemctl --user" if user else "systemctl"
    lines += ["next:", f"  {systemctl} daemon-reload", f"  {systemctl} enable --now bufbroker.socket"]
    if not user:
        lines.insert(-2, "  groupadd --system bufbroker   # members of this group may connect")
    return lines
