"""``bufbroker install-units``: the shipped systemd units, pointed at this installation.

A distribution package installs the units with ``ExecStart=/usr/bin/bufbrokerd``; a person who
installed with pip (often into a virtual environment) has bufbrokerd somewhere else. This
copies the units shipped as package data (``bufbroker/units``, ``bufbroker/units/user`` for a
user manager) and rewrites the program of every ``ExecStart=`` line to this installation's
bufbrokerd, by absolute path, without resolving symlinks: a venv's ``bin/`` is the right place
even when its python links to /usr/bin.

The system service runs sandboxed, as a user of its own (``DynamicUser=yes``) that cannot see
/home, /root and /run/user (``ProtectHome=yes``) nor the host's /tmp and /var/tmp
(``PrivateTmp=yes``). A bufbrokerd there, or one that other users cannot reach and read (or
whose Python or bufbroker package is such), fails to start (status 203/EXEC, or an
ImportError), so system units pointing at one are refused, with the way to a system install.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from pathlib import Path, PurePosixPath

__all__ = [
    "SYSTEM_DIR",
    "UnreachableDaemon",
    "bufbrokerd_path",
    "closed_to_others",
    "hidden_from_service",
    "install_units",
    "next_steps",
    "user_dir",
    "why_service_cannot_run",
]

SYSTEM_DIR = Path("/etc/systemd/system")
_EXEC_START = re.compile(r"^(ExecStart=[-@:+!]*)(\S+)", re.MULTILINE)

# What the system unit (units/bufbroker.service) hides from the service, and by which option.
HIDDEN = {
    PurePosixPath("/home"): "ProtectHome=yes",
    PurePosixPath("/root"): "ProtectHome=yes",
    PurePosixPath("/run/user"): "ProtectHome=yes",
    PurePosixPath("/tmp"): "PrivateTmp=yes",
    PurePosixPath("/var/tmp"): "PrivateTmp=yes",
}
SYSTEM_INSTALL = (
    "sudo /usr/bin/python3 -m venv /opt/bufbroker && sudo /opt/bufbroker/bin/pip install . "
    "&& sudo /opt/bufbroker/bin/bufbroker install-units"
)
# pip writes a /bin/sh trampoline instead of a #! line when the interpreter's path is long:
#   #!/bin/sh
#   '''exec' "/a/long/path/bin/python3" "$0" "$@"
_TRAMPOLINE = re.compile(r"^'''exec' \"?([^\"\s]+)", re.MULTILINE)


class UnreachableDaemon(OSError):
    """The system service could not run this bufbrokerd; the message says why and what to do."""


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


def hidden_from_service(path: PurePosixPath) -> str | None:
    """Why the system service cannot see ``path`` at all, or None (pure: looks at the name only)."""
    for top, option in HIDDEN.items():
        if path == top or top in path.parents:
            return f"{top} is hidden from the service ({option})"
    return None


def closed_to_others(path: Path, *, directory: bool = False) -> str | None:
    """Why a user who neither owns ``path`` nor is in its group cannot use it, or None.

    Every directory on the way needs search permission for others; the file itself read and
    execute permission (a script is read by its interpreter), a directory read and search
    permission. Symbolic links are followed, as the kernel follows them.
    """
    path = Path(os.path.abspath(path))
    for parent in reversed(path.parents):
        try:
            mode = parent.stat().st_mode
        except OSError as e:
            return f"{parent}: {e.strerror}"
        if not mode & stat.S_IXOTH:
            return f"{parent} is not searchable by other users (mode {stat.S_IMODE(mode):04o})"
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return f"{path}: {e.strerror}"
    wanted = stat.S_IROTH | stat.S_IXOTH
    if mode & wanted != wanted:
        kind = "directory" if directory else "file"
        return f"the {kind} is not readable and executable by other users (mode {stat.S_IMODE(mode):04o})"
    return None


def _interpreter(script: Path) -> Path | None:
    """The program a script's ``#!`` line (or pip's /bin/sh trampoline) runs it with."""
    try:
        with script.open("rb") as f:
            head = f.read(1024).decode(errors="replace")
    except OSError:
        return None
    if not head.startswith("#!"):
        return None  # a binary: the kernel runs it itself
    words = head[2:].split("\n", 1)[0].split()
    if not words:
        return None
    if words[0] == "/bin/sh" and (m := _TRAMPOLINE.search(head)):
        return Path(m[1])
    return Path(words[0])


def why_service_cannot_run(daemon: str, package: Path | None = None) -> str | None:
    """Why the sandboxed system service could not run ``daemon``; None if nothing is in the way.

    Looks at the program, its interpreter and, if given, the bufbroker package it imports, each
    by its path as written and as resolved: none may lie where the sandbox hides it, and a user
    that owns none of them (the service's dynamic user) must be able to reach and read each.
    """
    parts: list[tuple[str, Path, bool]] = [("", Path(daemon), False)]
    if (interpreter := _interpreter(Path(daemon))) is not None:
        parts.append(("its interpreter ", interpreter, False))
    if package is not None:
        parts.append(("the bufbroker package ", package, True))
    for what, path, directory in parts:
        # The path as written, then as resolved (a venv's python links to the one that made it).
        for form in dict.fromkeys([Path(os.path.abspath(path)), Path(os.path.realpath(path))]):
            why = hidden_from_service(PurePosixPath(form)) or closed_to_others(form, directory=directory)
            if why is not None:
                return why if not what and form == Path(daemon) else f"{what}{form}: {why}"
    return None


def _package_for(daemon: str) -> Path | None:
    """This bufbroker package, if ``daemon`` belongs to this installation (beside this Python)."""
    if Path(daemon).parent != Path(sys.executable).absolute().parent:
        return None
    return Path(__file__).absolute().parent.parent


def install_units(*, user: bool, dest: Path | None = None) -> list[Path]:
    """Write the units into ``dest`` (default: the manager's directory); return the paths written.

    System units are refused (UnreachableDaemon) when the sandboxed service could not run this
    installation's bufbrokerd; nothing is written then.
    """
    from importlib.resources import files

    source = files("bufbroker") / "units"
    if user:
        source = source / "user"
    target = dest if dest is not None else user_dir() if user else SYSTEM_DIR
    daemon = bufbrokerd_path()
    if not user and (why := why_service_cannot_run(daemon, _package_for(daemon))) is not None:
        raise UnreachableDaemon(
            f"the system service could not run {daemon}: {why}; install bufbroker where every "
            f"user can read it, e.g. from a checkout: {SYSTEM_INSTALL} (docs/SYSTEMD.md); "
            "or add --user"
        )
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


def next_steps(written: list[Path], *, user: bool, managed: bool = True) -> list[str]:
    """What to tell the person: the files written and the commands that start the broker.

    ``managed``: written where the manager reads units. Elsewhere (``--dest``) systemd never
    sees them until they are copied there, so that comes first.
    """
    systemctl = "systemctl --user" if user else "systemctl"
    lines = [f"wrote {path}" for path in written]
    lines.append("next:")
    if not managed:
        where = "~/.config/systemd/user/" if user else str(SYSTEM_DIR) + "/"
        names = " ".join(str(path) for path in written)
        lines.append(f"  cp {names} {where}   # systemd reads units there, not here")
    if not user:
        lines.append("  groupadd --system bufbroker   # its members may connect (docs/SYSTEMD.md)")
    lines += [f"  {systemctl} daemon-reload", f"  {systemctl} enable --now bufbroker.socket"]
    return lines
