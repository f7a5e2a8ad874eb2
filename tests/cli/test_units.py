"""``install-units``: the shipped units, with ExecStart= pointing at this installation."""

from __future__ import annotations

import json
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from bufbroker.cli import main
from bufbroker.cli._units import bufbrokerd_path, install_units, next_steps, user_dir


def _exec_start(unit: Path) -> str:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def test_bufbrokerd_is_the_one_beside_this_python() -> None:
    path = bufbrokerd_path()
    assert Path(path).is_absolute() and path == str(Path(sys.executable).parent / "bufbrokerd")


@pytest.mark.parametrize("user", [False, True])
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
        "  systemctl --user daemon-reload",
        "  systemctl --user enable --now bufbroker.socket",
    ]
    system = next_steps([Path("/etc/systemd/system/bufbroker.socket")], user=False)
    assert "  groupadd --system bufbroker   # its members may connect (docs/SYSTEMD.md)" in system
    assert system[-1] == "  systemctl enable --now bufbroker.socket"


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
