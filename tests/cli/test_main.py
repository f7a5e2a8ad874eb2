"""``main`` in this process, over a broker's answers written out by hand: options, outputs, errors."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from cli_fixtures import BUFFERS, FakeSource

from bufbroker import BrokerError
from bufbroker.cli import _main as cli_main
from bufbroker.cli import main


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Every ``main`` in the test talks to a FakeSource; the list collects the sockets asked for."""
    sockets: list[str | None] = []

    def connect(socket: str | None, timeout: float = 10.0) -> FakeSource:
        sockets.append(socket)
        return FakeSource()

    monkeypatch.setattr(cli_main, "_connect", connect)
    return sockets


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--socket", "/s", "ls"],
        ["ls", "--json", "--socket", "/s"],
        ["--socket", "/s", "ls", "--json"],
        ["--json", "ls", "--socket", "/s"],
    ],
)
def test_global_options_go_before_or_after_the_command(
    argv: list[str], asked: list[str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    assert asked == ["/s"]
    assert [row["id"] for row in json.loads(capsys.readouterr().out)] == [1, 2, 3]


def test_no_legend_before_or_after(asked: list[str | None], capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--no-legend", "devices"], ["devices", "--no-legend"]):
        assert main(argv) == 0
        assert capsys.readouterr().out.split()[:2] == ["1", "100"]
    assert asked == [None, None]  # the client picks its default path


def test_every_command_has_json_of_the_documented_shape(
    asked: list[str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    shapes = {"ls": list, "devices": list, "show 1": dict, "stats": dict, "bufinfo": dict}
    for command, shape in shapes.items():
        assert main([*command.split(), "--json"]) == 0
        assert isinstance(json.loads(capsys.readouterr().out), shape), command
    assert main(["devices", "--json"]) == 0
    assert "bufbroker-cli" not in capsys.readouterr().out  # our own connection is not listed


def test_bufinfo_text_ends_as_the_kernels_does(
    asked: list[str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    from bufbroker.cli._bufinfo import render_bufinfo

    assert main(["bufinfo"]) == 0
    assert capsys.readouterr().out == render_bufinfo(BUFFERS)


def test_show_of_a_missing_buffer_is_one_line_and_status_1(
    asked: list[str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "99"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "bufbroker: no buffer 99 (freed, or not visible to this user)\n"


def test_an_unreachable_broker_is_one_line_naming_the_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "nobody.sock")
    assert main(["ls", "--socket", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bufbroker: ")
    assert path in err and "bufbrokerd" in err
    # The user named the socket: systemd's socket and $BUFBROKER_SOCKET are beside the point.
    assert "systemctl" not in err and "BUFBROKER_SOCKET" not in err


def test_a_socket_we_may_not_open_says_who_may(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(name: str, *, socket: str, timeout: float) -> None:
        raise BrokerError(errno.EACCES, "cannot connect to /run/x.sock: Permission denied")

    monkeypatch.setattr("bufbroker.client.connect", refuse)
    assert main(["--socket", "/run/x.sock", "ls"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/run/x.sock" in err and "bufbroker group" in err


def test_a_broker_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Failing(FakeSource):
        def buffers(self) -> list[dict[str, object]]:
            raise BrokerError(errno.EAGAIN, "too many requests in flight")

    monkeypatch.setattr(cli_main, "_connect", lambda socket, timeout=0: Failing())
    assert main(["ls"]) == 1
    assert capsys.readouterr().err == "bufbroker: too many requests in flight\n"


def test_ctrl_c_is_quiet(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupted(FakeSource):
        def buffers(self) -> list[dict[str, object]]:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "_connect", lambda socket, timeout=0: Interrupted())
    assert main(["ls"]) == 130
    assert main(["top"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["show"],
        ["top", "--interval", "0"],
        ["top", "--iterations", "-1"],
        ["--json", "top"],  # top is for people; before any connection is tried
    ],
)
def test_usage_errors_are_argparses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and "usage: bufbroker" in capsys.readouterr().err
