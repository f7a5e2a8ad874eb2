"""``install-units``: the shipped units, with ExecStart= pointing at this installation."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path, PurePosixPath

import pytest

from bufbroker.cli import main
from bufbroker.cli._units import (
    HIDDEN,
    bufbrokerd_path,
    closed_to_others,
    hidden_from_service,
    install_units,
    next_steps,
    user_dir,
    why_service_cannot_run,
)


@pytest.fixture
def reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests about copying: wherever this checkout lies, the system service could run it."""
    monkeypatch.setattr("bufbroker.cli._units.why_service_cannot_run", lambda *args: None)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may search, unlike pytest's tmp_path (under a mode-0700 one)."""
    directory = Path(tempfile.mkdtemp(prefix="bufbroker-units-"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def home(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Inside ``open_dir``: a directory the service cannot see, as it cannot see /home; the rest
    of ``open_dir`` (under /tmp, which PrivateTmp= hides too) counts as a system location."""
    hidden = open_dir / "home"
    hidden.mkdir(mode=0o755)
    monkeypatch.setattr("bufbroker.cli._units.HIDDEN", {PurePosixPath(hidden): "ProtectHome=yes"})
    return hidden


def _script(path: Path, interpreter: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.write_text(f"#!{interpreter}\nimport sys\n")
    path.chmod(mode)
    return path


def _exec_start(unit: Path) -> str:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def test_bufbrokerd_is_the_one_beside_this_python() -> None:
    path = bufbrokerd_path()
    assert Path(path).is_absolute() and path == str(Path(sys.executable).parent / "bufbrokerd")


@pytest.mark.parametrize("user", [False, True])
@pytest.mark.usefixtures("reachable")
def test_units_are_copied_with_only_exec_start_changed(tmp_path: Path, user: bool) -> None:
    written = install_units(user=user, dest=tmp_path)
    assert sorted(p.name for p in written) == ["bufbroker.service", "bufbroker.socket"]
    shipped = files("bufbroker") / "units" / ("user" if user else "")
    service = tmp_path / "bufbroker.service"
    assert _exec_start(service) == bufbrokerd_path()
    original = (shipped / "bufbroker.service").read_text()
    assert service.read_text() == original.replace(
        "ExecStart=/usr/bin/bufbrokerd", f"ExecStart={bufbrokerd_path()}"
    )
    assert (tmp_path / "bufbroker.socket").read_text() == (shipped / "bufbroker.socket").read_text()


def test_user_units_go_to_the_user_managers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert user_dir() == tmp_path / "config" / "systemd" / "user"
    written = install_units(user=True)
    assert {p.parent for p in written} == {user_dir()}


def test_it_says_what_it_wrote_and_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-units", "--user", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'bufbroker.service'}",
        f"wrote {tmp_path / 'bufbroker.socket'}",
        "next:",
        # systemd never reads --dest: the units must be copied where it does first.
        f"  cp {tmp_path / 'bufbroker.service'} {tmp_path / 'bufbroker.socket'} ~/.config/systemd/user/"
        "   # systemd reads units there, not here",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable --now bufbroker.socket",
    ]
    system = next_steps([Path("/etc/systemd/system/bufbroker.socket")], user=False)
    assert "  groupadd --system bufbroker   # its members may connect (docs/SYSTEMD.md)" in system
    assert system[-1] == "  systemctl enable --now bufbroker.socket"


@pytest.mark.usefixtures("reachable")
def test_a_directory_it_cannot_write_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")  # not a directory, even for root
    dest = tmp_path / "file" / "units"
    assert main(["install-units", "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bufbroker: ") and str(tmp_path / "file") in err


def test_a_permission_error_says_how_to_get_past_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*, user: bool, dest: Path | None) -> list[Path]:
        raise PermissionError(13, "Permission denied", "/etc/systemd/system/bufbroker.service")

    monkeypatch.setattr("bufbroker.cli._units.install_units", refuse)
    assert main(["install-units"]) == 1
    assert capsys.readouterr().err == (
        "bufbroker: /etc/systemd/system/bufbroker.service: Permission denied"
        " (run it as root, or add --user)\n"
    )


def test_json_lists_the_paths_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-units", "--user", "--dest", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        str(tmp_path / "bufbroker.service"),
        str(tmp_path / "bufbroker.socket"),
    ]


@pytest.mark.parametrize(
    ("path", "top"),
    [
        ("/home/alice/src/.venv/bin/bufbrokerd", "/home is hidden from the service (ProtectHome=yes)"),
        ("/home", "/home is hidden from the service (ProtectHome=yes)"),
        ("/root/.pyenv/versions/3.11.7/bin/python3.11", "/root is hidden from the service (ProtectHome=yes)"),
        ("/run/user/1000/bufbroker/bin/bufbrokerd", "/run/user is hidden from the service (ProtectHome=yes)"),
        ("/tmp/venv/bin/bufbrokerd", "/tmp is hidden from the service (PrivateTmp=yes)"),
        ("/var/tmp/venv/bin/bufbrokerd", "/var/tmp is hidden from the service (PrivateTmp=yes)"),
        ("/opt/bufbroker/bin/bufbrokerd", None),
        ("/usr/bin/bufbrokerd", None),
        ("/usr/local/bin/bufbrokerd", None),
        ("/homes/alice/bufbrokerd", None),  # a neighbour of /home, not under it
        ("/run/users/bufbrokerd", None),
        ("/srv/home/bufbrokerd", None),
    ],
)
def test_what_the_service_cannot_see_is_told_by_the_path_alone(path: str, top: str | None) -> None:
    assert hidden_from_service(PurePosixPath(path)) == top


def test_what_is_hidden_is_what_the_shipped_unit_hides() -> None:
    service = (files("bufbroker") / "units" / "bufbroker.service").read_text().splitlines()
    assert {"DynamicUser=yes", "ProtectHome=yes", "PrivateTmp=yes"} <= set(service)
    assert set(HIDDEN.values()) == {"ProtectHome=yes", "PrivateTmp=yes"}


def test_others_must_search_every_directory_and_read_and_run_the_file(open_dir: Path) -> None:
    daemon = _script(open_dir / "venv" / "bin" / "bufbrokerd", "/usr/bin/python3")
    assert closed_to_others(daemon) is None
    (open_dir / "venv").chmod(0o750)  # group only: the service's own user is in no group of ours
    assert closed_to_others(daemon) == f"{open_dir / 'venv'} is not searchable by other users (mode 0750)"
    (open_dir / "venv").chmod(0o711)  # search without listing is enough on the way
    assert closed_to_others(daemon) is None
    daemon.chmod(0o711)  # a script is read by its interpreter: execute alone is not enough
    assert closed_to_others(daemon) == "the file is not readable and executable by other users (mode 0711)"
    assert closed_to_others(open_dir / "venv", directory=True) == (
        "the directory is not readable and executable by other users (mode 0711)"
    )
    assert closed_to_others(open_dir / "missing") == f"{open_dir / 'missing'}: No such file or directory"
    (open_dir / "link").symlink_to(daemon)  # followed, as the kernel follows it
    assert closed_to_others(open_dir / "link") == closed_to_others(daemon)


def test_a_daemon_under_a_hidden_directory_is_refused(home: Path, open_dir: Path) -> None:
    daemon = _script(home / "alice" / "venv" / "bin" / "bufbrokerd", "/usr/bin/python3")
    assert why_service_cannot_run(str(daemon)) == f"{home} is hidden from the service (ProtectHome=yes)"
    opt = _script(open_dir / "opt" / "bufbroker" / "bin" / "bufbrokerd", "/usr/bin/python3")
    assert why_service_cannot_run(str(opt)) is None
    (open_dir / "usr-bin").mkdir(mode=0o755)
    (open_dir / "usr-bin" / "bufbrokerd").symlink_to(daemon)  # a link to it is no way around
    assert why_service_cannot_run(str(open_dir / "usr-bin" / "bufbrokerd")) == (
        f"{daemon}: {home} is hidden from the service (ProtectHome=yes)"
    )


def test_the_interpreter_and_the_package_must_be_reachable_too(home: Path, open_dir: Path) -> None:
    """A venv in /opt made by a Python under /root (pyenv, uv) links its python there."""
    venv = open_dir / "opt" / "bufbroker"
    (home / "pyenv").mkdir(mode=0o755)
    _script(home / "pyenv" / "python3.11", "/bin/sh")
    (venv / "bin").mkdir(parents=True, mode=0o755)
    (venv / "bin" / "python3").symlink_to(home / "pyenv" / "python3.11")
    daemon = _script(venv / "bin" / "bufbrokerd", str(venv / "bin" / "python3"))
    hidden_python = f"its interpreter {home / 'pyenv' / 'python3.11'}: {home} is hidden from the service"
    hidden_python += " (ProtectHome=yes)"
    assert why_service_cannot_run(str(daemon)) == hidden_python
    # pip's trampoline for long interpreter paths names the interpreter on its second line
    python = venv / "bin" / "python3"
    trampoline = ["#!/bin/sh", "'''exec' " + f'"{python}" "$0" "$@"', "' '''", "import sys"]
    daemon.write_text("\n".join(trampoline) + "\n")
    assert why_service_cannot_run(str(daemon)) == hidden_python
    daemon.write_text("#!/usr/bin/python3\n")
    assert why_service_cannot_run(str(daemon)) is None
    package = venv / "lib" / "bufbroker"
    package.mkdir(parents=True, mode=0o700)  # installed under umask 077
    assert why_service_cannot_run(str(daemon), package) == (
        f"the bufbroker package {package}: "
        "the directory is not readable and executable by other users (mode 0700)"
    )


def test_install_units_refuses_in_one_line_and_writes_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = _script(home / "alice" / ".venv" / "bin" / "bufbrokerd", "/usr/bin/python3")
    monkeypatch.setattr("bufbroker.cli._units.bufbrokerd_path", lambda: str(daemon))
    dest = tmp_path / "units"
    assert main(["install-units", "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bufbroker: the system service could not run {daemon}: ")
    assert f"{home} is hidden from the service (ProtectHome=yes)" in err
    assert "/usr/bin/python3 -m venv /opt/bufbroker" in err and "docs/SYSTEMD.md" in err
    assert not dest.exists()
    # a user's own manager runs it as that user, unsandboxed: nothing to refuse
    assert main(["install-units", "--user", "--dest", str(dest)]) == 0
    assert _exec_start(dest / "bufbroker.service") == str(daemon)
