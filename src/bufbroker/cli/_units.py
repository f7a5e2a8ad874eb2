"""``bufbroker install-units``: the shipped systemd units, pointed at this installation.

A distribution package installs the units with ``ExecStart=/usr/bin/bufbrokerd``; a person who
installed with pip (often into a virtual environment) has bufbrokerd somewhere else. This
copies the units shipped as package data (``bufbroker/units``, ``bufbroker/units/user`` for a
user manager) and rewrites the program of every ``ExecStart=`` line to this installation's
bufbrokerd, by absolute path, without resolving symlinks: a venv's ``bin/`` is the right place
even when its python links to /usr/bin.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["SYSTEM_DIR", "bufbrokerd_path", "install_units", "next_steps", "user_dir"]

SYSTEM_DIR = Path("/etc/systemd/system")
_EXEC_START = re.compile(r"^(ExecStart=[-@:+!]*)(\S+)", re.MULTILINE)


def user_dir() -> Path:
    """Where a user manager looks for units the user wrote: $XDG_CONFIG_HOME/systemd/user."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def bufbrokerd_path() -> str:
    """This installation's bufbrokerd: beside the running Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "bufbrokerd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("bufbrokerd")
    if found is None:
        raise FileNotFoundError(
            f"bufbrokerd is neither beside {sys.executable} nor on PATH: is bufbroker installed?"
        )
    return str(Path(found).absolute())


def install_units(*, user: bool, dest: Path | None = None) -> list[Path]:
    """Write the units into ``dest`` (default: the manager's directory); return the paths written."""
    from importlib.resources import files

    source = files("bufbroker") / "units"
    if user:
        source = source / "user"
    target = dest if dest is not None else user_dir() if user else SYSTEM_DIR
    daemon = bufbrokerd_path()
    units = sorted(
        (u for u in source.iterdir() if u.is_file() and u.name.endswith((".service", ".socket"))),
        key=lambda u: u.name,
    )
    if not units:
        raise FileNotFoundError(f"no unit files in the installed package ({source})")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for unit in units:
        text = _EXEC_START.sub(lambda m: m[1] + daemon, unit.read_text())
        path = target / unit.name
        path.write_text(text)
        written.append(path)
    return written


def next_steps(written: list[Path], *, user: bool) -> list[str]:
    """What to tell the person: the files written and the commands that start the broker."""
    systemctl = "systemctl --user" if user else "systemctl"
    lines = [f"wrote {path}" for path in written]
    lines.append("next:")
    if not user:
        lines.append("  groupadd --system bufbroker   # its members may connect (docs/SYSTEMD.md)")
    lines += [f"  {systemctl} daemon-reload", f"  {systemctl} enable --now bufbroker.socket"]
    return lines
