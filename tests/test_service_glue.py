"""The systemd glue on its own: notify over path and abstract sockets, listen fds, TOML, journal."""

from __future__ import annotations

import array
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgpack

from bufbroker.broker._config import Config, from_arguments, load_toml
from bufbroker.broker._main import _parser
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
        assert lines == ["FDSTORE=1", "FDNAME=m.7"] and len(fds) == 1
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
