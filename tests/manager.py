"""A stand-in for systemd in the tests: the notify socket, the fd store and socket activation.

It speaks the same protocol systemd does (sd_notify(3), sd_listen_fds(3)): datagrams of
KEY=VALUE lines on NOTIFY_SOCKET, descriptors stored with FDSTORE=1/FDNAME=, and a restart that
hands the store back as LISTEN_FDS/LISTEN_FDNAMES with LISTEN_PID set to the new process.
With ``fdstore=False`` it is a manager without a store (FileDescriptorStoreMax=0): it closes
every descriptor sent with FDSTORE=1, as systemd does, and hands nothing back.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

MAIN = "from bufbroker.broker._main import main; raise SystemExit(main())"


@dataclass
class Manager:
    directory: Path
    flags: tuple[str, ...] = ()
    watchdog_usec: int | None = None
    fdstore: bool = True
    env: dict[str, str] = field(default_factory=dict)  # more environment for the broker
    notify: socket.socket = field(init=False)
    messages: list[dict[str, str]] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # time.monotonic() of each message
    store: dict[str, list[int]] = field(default_factory=dict)  # name → fds (the manager's copies)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(self.directory / "notify"))
        self.socket = str(self.directory / "bufbroker.sock")
        # Like systemd, read notifications as they come, whatever the test is doing.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_forever, daemon=True)
        self._reader.start()

    def _read_forever(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._pump(0.0)
            time.sleep(0.005)

    def start(self, *, listening: socket.socket | None = None) -> None:
        """Start the broker, handing it the fd store (and a listening socket) as LISTEN_FDS."""
        named: list[tuple[int, str]] = []
        if listening is not None:
            named.append((listening.fileno(), "bufbroker.socket"))
        with self._lock:
            named += [(fd, name) for name, fds in self.store.items() for fd in fds]
            self.messages.clear()  # what the new process says, from READY on
            self.received.clear()
        env = {"NOTIFY_SOCKET": str(self.directory / "notify"), **self.env}
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        if named:
            env["LISTEN_FDS"] = str(len(named))
            env["LISTEN_FDNAMES"] = ":".join(name for _, name in named)

        def in_child() -> None:  # runs between fork and exec: fds to 3.., LISTEN_PID to us
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd, _ in named]  # out of 3..n's way
            for i, fd in enumerate(moved):
                os.dup2(fd, 3 + i)
            for k, v in env.items():
                os.environ[k] = v
            if named:
                os.environ["LISTEN_PID"] = str(os.getpid())

        log = (self.directory / "bufbrokerd.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MAIN, "--socket", self.socket, "--log-level", "debug", *self.flags],
            stdout=log,
            stderr=log,
            preexec_fn=in_child,
            pass_fds=tuple(range(3, 3 + len(named))),
        )
        log.close()

    def log(self) -> str:
        return (self.directory / "bufbrokerd.log").read_text()

    def pump(self, timeout: float = 0.0) -> None:
        """Take in every notification waiting on the socket (the reader thread does it too)."""
        time.sleep(timeout)
        with self._lock:
            self._pump(0.0)

    def _pump(self, timeout: float) -> None:
        while select.select([self.notify], [], [], timeout)[0]:
            timeout = 0.0
            data, ancdata, _, _ = self.notify.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            self.received.append(time.monotonic())
            if fields.get("FDSTORE") == "1" and self.fdstore:
                self.store.setdefault(fields.get("FDNAME", "stored"), []).extend(fds)
            else:
                for fd in fds:
                    os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(fields.get("FDNAME", "stored"), []):
                    os.close(fd)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached; broker log:\n{self.log()}")
            self.pump(0.02)

    def said(self, key: str) -> list[str]:
        with self._lock:
            return [m[key] for m in self.messages if key in m]

    def when(self, key: str) -> list[float]:
        """When (time.monotonic()) each message carrying ``key`` arrived."""
        with self._lock:
            return [t for m, t in zip(self.messages, self.received, strict=True) if key in m]

    def snapshot(self) -> dict[str, Any] | None:
        """The newest snapshot in the store (``s.<generation>``), unpacked; None if there is none."""
        with self._lock:
            generations = [int(name[2:]) for name in self.store if name.startswith("s.")]
            if not generations:
                return None
            (fd,) = self.store[f"s.{max(generations)}"]
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        snapshot: dict[str, Any] = msgpack.unpackb(data)
        return snapshot

    def snapshot_names(self) -> dict[int, str | None]:
        """Buffer id → name, as the newest snapshot has them."""
        snapshot = self.snapshot()
        return {} if snapshot is None else {b["id"]: b["name"] for b in snapshot["buffers"]}

    def stored(self) -> list[str]:
        with self._lock:
            return list(self.store)

    def kill(self, signum: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        code = self.proc.wait(10)
        self.pump()
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stop.set()
        self._reader.join()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()
        self.notify.close()
