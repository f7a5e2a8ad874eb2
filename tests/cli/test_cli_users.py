"""The ``bufbroker`` command as people meet it: its version, buffers by name, ``q`` to leave
``top``, a broker that does not answer, sockets that are not a broker's, and names chosen by a
hostile client that must not reach the terminal as control sequences."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import bufbroker
from bufbroker import Direction

from conftest import Broker

_SCRIPT = Path(sys.executable).parent / "bufbroker"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bufbroker.cli"]


def run(*args: str, socket_path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    if socket_path is not None:
        env["BUFBROKER_SOCKET"] = socket_path
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def test_version() -> None:
    out = run("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"bufbroker {bufbroker.__version__}")


def test_show_by_name(broker: Broker) -> None:
    with broker.connect("camera") as dev:
        frame = dev.allocate(8192, name="frame-0")
        dev.allocate(4096, name="12345")  # a name of digits, no buffer of that id
        shown = json.loads(run("show", "frame-0", "--json", socket_path=broker.socket).stdout)
        assert shown["id"] == frame.id
        by_id = json.loads(run("show", str(frame.id), "--json", socket_path=broker.socket).stdout)
        assert by_id["id"] == frame.id
        assert json.loads(run("show", "12345", "--json", socket_path=broker.socket).stdout)["name"] == "12345"
        missing = run("show", "nope", socket_path=broker.socket)
        assert missing.returncode == 1 and "no buffer named 'nope'" in missing.stderr


def test_a_stopped_broker_is_a_timeout_naming_the_socket(broker: Broker) -> None:
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        out = run("ls", "--timeout", "0.5", socket_path=broker.socket)
        assert time.monotonic() - start < 30
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert broker.socket in out.stderr and "no answer" in out.stderr


def test_what_is_not_a_broker_says_what_it_is(tmp_path: Path) -> None:
    directory = run("ls", "--socket", str(tmp_path))
    assert directory.returncode == 1 and f"{tmp_path} is a directory" in directory.stderr
    assert "bufbrokerd --socket" not in directory.stderr  # no broker can listen on a directory
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "stream.sock"))
    stream.listen(1)
    try:
        out = run("ls", "--socket", str(tmp_path / "stream.sock"))
    finally:
        stream.close()
    assert out.returncode == 1 and str(tmp_path / "stream.sock") in out.stderr
    assert "not a bufbroker socket" in out.stderr


def test_q_leaves_top(broker: Broker) -> None:
    leader, follower = pty.openpty()
    env = {**os.environ, "BUFBROKER_SOCKET": broker.socket}
    proc = subprocess.Popen([*CLI, "top", "--interval", "30"], stdin=follower, stdout=follower, env=env)
    os.close(follower)
    try:
        shown = b""
        while b"sorted by" not in shown:  # the first frame is drawn
            assert select.select([leader], [], [], 30)[0], shown
            shown += os.read(leader, 4096)
        os.write(leader, b"q")
        assert proc.wait(10) == 0  # long before the 30 s interval
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


HOSTILE = "\x1b[2J\x1b]0;owned\x07\nFAKE"  # clear screen, retitle, bell, a fake row


def test_names_a_client_chose_cannot_drive_the_terminal(broker: Broker) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, bufbroker\n"
            "dev = bufbroker.connect(sys.argv[1], socket=sys.argv[2])\n"
            "buf = dev.allocate(4096, name=sys.argv[1])\n"
            "buf.attach().map()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
            HOSTILE,
            broker.socket,
            HOSTILE,  # on the command line too
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with broker.connect() as dev:
            buffer_id = dev.buffers()[0]["id"]
        for command in (
            ["ls"],
            ["devices"],
            ["show", str(buffer_id)],
            ["bufinfo"],
            ["top", "--iterations", "1"],
        ):
            out = run(*command, socket_path=broker.socket)
            assert out.returncode == 0, out.stderr
            assert not any(c in out.stdout for c in "\x1b\x07"), (command, out.stdout)
            assert "\\x1b[2J\\x1b]0;owned\\x07\\x0aFAKE" in out.stdout, command
            assert not any(line.startswith("FAKE") for line in out.stdout.splitlines()), command
        # JSON keeps the names as they are (escaped by JSON itself).
        rows = json.loads(run("ls", "--json", socket_path=broker.socket).stdout)
        assert rows[0]["name"] == HOSTILE
        missing = run("show", HOSTILE + "?", socket_path=broker.socket)
        assert missing.returncode == 1 and "\x1b" not in missing.stderr
    finally:
        holder.kill()
        holder.wait()
        for stream in (holder.stdin, holder.stdout):
            if stream:
                stream.close()


def test_devices_json_ids_are_the_ones_show_uses(broker: Broker) -> None:
    with broker.connect("camera") as dev:
        buf = dev.allocate(4096, name="f")
        with buf.attach() as att, att.map(Direction.TO_DEVICE):
            devices = json.loads(run("devices", "--json", socket_path=broker.socket).stdout)
            assert [d["id"] for d in devices] == [dev.id]
            shown = json.loads(run("show", "f", "--json", socket_path=broker.socket).stdout)
            assert [a["device"] for a in shown["attachments"]] == [dev.id]


def test_a_plain_command_line_imports_nothing_heavy(broker: Broker) -> None:
    code = (
        "import sys\nfrom bufbroker.cli import main\n"
        "for command in ('ls', 'devices', 'timelines', 'streams', 'show 1', 'bufinfo', 'stats',"
        " 'ls --json --socket "
        + broker.socket
        + "'):\n"
        "    assert main(command.split()) == 0\n"
        "heavy = {'argparse', 'typing', 'socket', 'dataclasses', 'trio', 'shutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    with broker.connect() as dev:
        dev.allocate(4096)
        env = {**os.environ, "BUFBROKER_SOCKET": broker.socket}
        out = subprocess.run(
            [sys.executable, "-c", code], timeout=60, env=env, capture_output=True, text=True
        )
    assert out.returncode == 0, out.stderr
