"""The systemd glue on its own: notify over path and abstract sockets, listen fds, TOML, journal."""

from __future__ import annotations

import array
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from bufbroker._paths import default_socket_path, socket_path_for
from bufbroker.broker._config import Config, from_arguments, load_toml
from bufbroker.broker._main import _parser, _tell_manager
from bufbroker.broker._server import Server
from bufbroker.broker._systemd import JournalFormatter, ServiceManager, journal_stream

from conftest import Broker


def _receive(sock: socket.socket) -> tuple[list[str], list[int]]:
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
    fds = [fd for _, _, d in ancdata for fd in array.array("i", d)]
    return data.decode().splitlines(), fds


def test_notify_reaches_an_abstract_socket_with_descriptors() -> None:
    name = f"bufbroker-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    manager = ServiceManager({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"})
    try:
        assert manager.present and manager.watchdog_period() == 0.2
        manager.ready("3 buffers")
        assert _receive(listener) == (["READY=1", "STATUS=3 buffers"], [])
        r, w = os.pipe()
        manager.fdstore([r], "m.7")
        lines, fds = _receive(listener)
        assert lines == ["FDSTORE=1", "FDNAME=m.7", "FDPOLL=0"] and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
        manager.fdstore_remove("m.7")
        assert _receive(listener)[0] == ["FDSTOREREMOVE=1", "FDNAME=m.7"]
        for fd in (r, w, *fds):
            os.close(fd)
    finally:
        manager.close()
        listener.close()


def test_without_a_manager_everything_is_a_no_op() -> None:
    manager = ServiceManager({})
    assert not manager.present and manager.watchdog_period() is None
    manager.ready()
    manager.fdstore([0], "x")


class _Recorder(ServiceManager):
    """A manager that notes what it is told, and when (trio's clock), instead of sending it."""

    def __init__(self, environ: dict[str, str]) -> None:
        super().__init__(environ)
        self.told: list[tuple[float, tuple[str, ...]]] = []

    def notify(self, *fields: str, fds: Sequence[int] = ()) -> None:
        self.told.append((trio.current_time(), fields))


def test_watchdog_pings_come_at_half_of_watchdog_usec_even_when_it_is_long() -> None:
    """WatchdogSec=30s (the shipped unit): a ping every 15 s, while STATUS is looked at every second."""
    manager = _Recorder({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "30000000"})

    async def run_for_a_while() -> None:
        server = Server(Config(), version="test")  # never serving: only its state is looked at
        try:
            with trio.move_on_after(61):
                await _tell_manager(manager, server)
        finally:
            server.handles.close()

    try:
        trio.run(run_for_a_while, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        manager.close()
    pings = [t for t, fields in manager.told if fields == ("WATCHDOG=1",)]
    assert [t - pings[0] for t in pings] == [0.0, 15.0, 30.0, 45.0, 60.0]
    assert [fields for _, fields in manager.told if fields != ("WATCHDOG=1",)] == [
        ("STATUS=0 buffers, 0 bytes, 0 devices, 0 handles",)
    ]


def test_the_store_size_is_read_from_fdstore_when_the_manager_gives_it() -> None:
    told = ServiceManager({"NOTIFY_SOCKET": "/nonexistent", "FDSTORE": "32768"})
    silent = ServiceManager({"NOTIFY_SOCKET": "/nonexistent"})  # systemd before 254 never says
    assert (told.fdstore_max, silent.fdstore_max, ServiceManager({"FDSTORE": "9"}).fdstore_max) == (
        32768,
        None,
        None,
    )
    told.close()
    silent.close()


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    manager = ServiceManager({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert manager.watchdog_period() is None
    manager.close()


def test_toml_keys_are_the_limits_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "bufbroker.toml"
    path.write_text('max_buffers_per_uid = 99\nmax_bytes_per_uid = "8M"\nhandshake_timeout = 2.5\n')
    args = _parser().parse_args(["--max-buffers-per-uid", "7"])
    config = from_arguments(args, load_toml(path))
    assert (config.max_buffers_per_uid, config.max_bytes_per_uid, config.handshake_timeout) == (
        7,
        8 << 20,
        2.5,
    )
    assert config.max_message_size == Config().max_message_size
    path.write_text("max_bufers_per_uid = 1\n")  # a typo is an error, not silently ignored
    try:
        load_toml(path)
    except ValueError as e:
        assert "max_bufers_per_uid" in str(e)
    else:
        raise AssertionError("an unknown key was accepted")


def test_the_daemon_reads_its_config_file(broker_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "limits.toml"
    path.write_text("max_buffers_per_uid = 5\n")
    broker = broker_factory("--config", str(path))
    with broker.connect() as dev:
        assert dev.stats()["limits"]["max_buffers_per_uid"] == 5


def test_journal_lines_carry_their_priority(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    formatter = JournalFormatter("%(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert formatter.format(record) == "<4>two\n<4>lines"
    code = (
        "import os, sys; from bufbroker.broker._systemd import journal_stream; "
        "st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; "
        "print(journal_stream())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    monkeypatch.setenv("JOURNAL_STREAM", "0:0")  # some other stream: not the journal
    assert journal_stream() is False


def test_peers_that_vanish_before_their_replies_cost_the_broker_nothing(broker: Broker) -> None:
    """Regression: a reply to a peer that is gone used to raise out of its connection task."""
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(broker.socket)
        s.send(msgpack.packb([0, 0, "hello", {"version": 1, "name": "hit-and-run"}]))
        for i in range(50):
            s.send(msgpack.packb([0, i + 1, "stats", {}]))
        s.close()
    with broker.connect("after") as dev:
        broker.wait_for(lambda: [d["name"] for d in dev.devices()] == ["after"])
    assert broker.proc.poll() is None


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"BUFBROKER_SOCKET": "/srv/b.sock", "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/srv/b.sock"),
        ({"BUFBROKER_SOCKET": "/srv/b.sock"}, 0, "/srv/b.sock"),
        (
            {"BUFBROKER_SOCKET": "", "XDG_RUNTIME_DIR": "/run/user/1000"},
            1000,
            "/run/user/1000/bufbroker/bufbroker.sock",
        ),
        ({"XDG_RUNTIME_DIR": "/run/user/0"}, 0, "/run/bufbroker/bufbroker.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/bufbroker/bufbroker.sock"),
        ({}, 1000, "/run/user/1000/bufbroker/bufbroker.sock"),  # no runtime dir in the environment
    ],
)
def test_the_default_socket_follows_the_design(environ: dict[str, str], euid: int, expected: str) -> None:
    assert socket_path_for(environ, euid=euid, uid=euid) == expected


def test_the_default_socket_does_not_depend_on_which_sockets_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user whose own broker is down is told so, not handed to another broker (the default socket rule);
    members of the bufbroker group set BUFBROKER_SOCKET to reach the system one."""
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("BUFBROKER_SOCKET", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    mine = str(runtime / "bufbroker" / "bufbroker.sock")
    assert default_socket_path() == mine  # nothing exists yet
    system = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    system.bind(str(tmp_path / "system.sock"))
    system.listen()
    try:
        monkeypatch.setattr("bufbroker._paths.SYSTEM_SOCKET", str(tmp_path / "system.sock"))
        assert default_socket_path() == mine  # a system socket beside it changes nothing
        monkeypatch.setenv("BUFBROKER_SOCKET", str(tmp_path / "system.sock"))
        assert default_socket_path() == str(tmp_path / "system.sock")
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        monkeypatch.delenv("BUFBROKER_SOCKET")
        assert default_socket_path() == str(tmp_path / "system.sock")
    finally:
        system.close()
