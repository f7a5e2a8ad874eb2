"""Fixtures: a real bufbrokerd on a real socket, and real peer processes.

Every daemon and peer a test starts is stopped by that test, by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

import bufbroker

# Shared, noisy machines: a property is judged by its examples, never by their wall-clock time.
settings.register_profile("bufbroker", deadline=None)
settings.load_profile("bufbroker")

PEER = str(Path(__file__).with_name("peer.py"))
EXPORTER = str(Path(__file__).with_name("exporter_peer.py"))


@dataclass
class Broker:
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, name: str = "test", **kwargs: object) -> bufbroker.Device:
        return bufbroker.connect(name, socket=self.socket, **kwargs)  # type: ignore[arg-type]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` (the broker learns of closes asynchronously, in microseconds)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.005)


def start_broker(directory: Path, *flags: str, user: int | None = None, nofile: int | None = None) -> Broker:
    """bufbrokerd on ``directory``/bufbroker.sock, as ``user`` if given (we must be root), with
    at most ``nofile`` descriptors if given.

    The interpreter may live where only root can read (a home directory), so the broker is
    started as root and drops to ``user`` once its modules are loaded, as the peers do.
    """
    path = str(directory / "bufbroker.sock")
    drop = "" if user is None else f"import os; os.setgroups([]); os.setgid({user}); os.setuid({user}); "
    if nofile is not None:
        drop += f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
    log = directory / "bufbrokerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from bufbroker.broker._main import main; {drop}raise SystemExit(main())",
                "--socket",
                path,
                "--log-level",
                "debug",
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while not listening(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"bufbrokerd did not start:\n{log.read_text()}")
        time.sleep(0.02)
    return Broker(path, proc, log)


def listening(path: str) -> bool:
    """Whether a socket listens on ``path``, seen in /proc/net/unix without connecting to it.

    A probe connection would linger in the broker for a moment after it is closed, and tests
    that count the broker's descriptors or connections would see it.
    """
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            # Flags 00010000 is __SO_ACCEPTCON: listen() was called.
            if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []
    directories: list[str] = []

    def factory(*flags: str, nofile: int | None = None) -> Broker:
        # Not under pytest's tmp_path (mode 0700): tests connect as other uids too.
        directory = tempfile.mkdtemp(prefix="bufbroker-test-")
        os.chmod(directory, 0o755)
        directories.append(directory)
        b = start_broker(Path(directory), *flags, nofile=nofile)
        started.append(b)
        return b

    yield factory
    for b in started:
        b.stop()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


@pytest.fixture
def other_uid() -> int:
    """A uid that is not ours, for peers that must be another user (they drop to it)."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    return 65534


@dataclass
class Peer:
    """A separate Python process running one of peer.py's roles; talks JSON lines."""

    proc: subprocess.Popen[str]
    passed: list[int] = field(default_factory=list)

    @classmethod
    def start(
        cls, script: str, *args: object, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
    ) -> Peer:
        proc = subprocess.Popen(
            [sys.executable, script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
            env={**os.environ, **(env or {})},
        )
        return cls(proc)

    def stop(self) -> None:
        """Kill it if it still runs (by its pid), reap it, close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(5)
            raise AssertionError(
                f"peer exited ({self.proc.returncode}): {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        return text.strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20) -> int:
        _, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return self.proc.returncode


@pytest.fixture
def exporter() -> Iterator[Callable[..., Peer]]:
    """Starts exporter_peer.py processes: ``exporter(broker, name, mode, **env)``, once ready."""
    started: list[Peer] = []

    def start(broker: Broker, name: str, mode: str = "good", **env: str) -> Peer:
        started.append(Peer.start(EXPORTER, broker.socket, name, mode, env=env))
        ready = started[-1].line()
        assert '"ready": true' in ready, ready
        return started[-1]

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def run(
        role: str, *args: object, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
    ) -> Peer:
        peers.append(Peer.start(PEER, role, *args, pass_fds=pass_fds, env=env))
        return peers[-1]

    yield run
    for p in peers:
        p.stop()


class RawClient:
    """A hand-driven connection for sending what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sock.settimeout(10)

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        from bufbroker.protocol import ancillary

        self.sock.sendmsg([data], ancillary(fds))

    def request(self, id: int, op: str, args: object, fds: tuple[int, ...] = ()) -> None:
        import msgpack

        self.send(msgpack.packb([0, id, op, args]), fds)

    def recv(self) -> Any:
        """The next message as a plain list, or None at end of file."""
        import msgpack

        data, ancdata, _, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(64))
        from bufbroker.protocol import close_all, fds_from_ancillary

        close_all(fds_from_ancillary(ancdata, 0, 16))
        return msgpack.unpackb(data) if data else None

    def hello(self) -> None:
        self.request(0, "hello", {"version": 1, "name": "raw"})
        reply = self.recv()
        assert isinstance(reply, list) and reply[0] == 1, reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[[Broker], RawClient]]:
    clients: list[RawClient] = []

    def make(b: Broker) -> RawClient:
        c = RawClient(b.socket)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
