"""Two hosts on one machine: two brokers on two sockets, and a Flight service on loopback.

Broker ``a`` stands for the host that serves, ``b`` for the host that fetches. The service is a
real ``python -m bufbroker.flight`` process on 127.0.0.1 with a port the kernel picks; each
test stops every service it started, by pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import bufbroker
from bufbroker import Access

from conftest import Broker

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    location: str
    log: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, key: str) -> int:
        """A line of /proc/PID/status in kB (RssAnon, VmRSS, ...)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log)
        return self.proc.returncode


def start_service(socket: str, *flags: str, scheme: str = "grpc", user: int | None = None) -> Service:
    """``bufbroker-flight`` in front of the broker at ``socket``, on a free loopback port.

    As ``user`` if given: started as root, it drops to that uid once its modules are loaded (the
    interpreter may live where only root can read), as the test brokers do.
    """
    fd, log = tempfile.mkstemp(prefix="bufbroker-flight-", suffix=".log")
    drop = "" if user is None else f"os.setgroups([]); os.setgid({user}); os.setuid({user}); "
    warm = "_parser().format_help(); " if user is not None else ""  # imports argparse makes lazily
    code = (
        f"import os; from bufbroker.flight._main import _parser, main; {warm}{drop}raise SystemExit(main())"
    )
    argv = ["--listen", f"{scheme}://127.0.0.1:0", "--socket", socket, *flags]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=fd)
    os.close(fd)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith(f"listening on {scheme}://127.0.0.1:"):
        proc.kill()
        proc.wait()
        with open(log) as f:
            raise RuntimeError(f"bufbroker-flight did not start: {line!r} {f.read()}")
    return Service(proc, line.split()[-1], log)


@dataclass
class Hosts:
    a: Broker
    b: Broker
    serve: Callable[..., Service]


@pytest.fixture
def hosts(broker_factory: Callable[..., Broker]) -> Iterator[Hosts]:
    a, b = broker_factory(), broker_factory()
    services: list[Service] = []

    def serve(*flags: str, broker: Broker = a, scheme: str = "grpc", user: int | None = None) -> Service:
        services.append(start_service(broker.socket, *flags, scheme=scheme, user=user))
        return services[-1]

    yield Hosts(a, b, serve)
    for service in services:
        service.stop()


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ at every offset of every page, so a misplaced chunk shows."""
    block = bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(65521))  # a prime length
    return (block * (size // len(block) + 1))[:size]


def publish(device: bufbroker.Device, name: str, data: bytes) -> bufbroker.Buffer:
    buffer = device.allocate(len(data), name=name)
    with buffer.cpu_access(Access.WRITE) as memory:
        memory[: len(data)] = data
    return buffer


def contents(buffer: bufbroker.Buffer) -> bytes:
    """The buffer's ``.size`` bytes."""
    with buffer.cpu_access(Access.READ) as memory:
        return bytes(memory[: buffer.size])


def entries(broker: Broker) -> list[dict[str, Any]]:
    with broker.connect("inspect") as device:
        return device.buffers()


def entry(broker: Broker, name: str) -> dict[str, Any] | None:
    return next((e for e in entries(broker) if e["name"] == name), None)


def flight_devices(broker: Broker) -> list[dict[str, Any]]:
    with broker.connect("inspect") as device:
        return [d for d in device.devices() if d["name"].startswith("flight-")]


def idle(broker: Broker, name: str, handles: int = 1) -> bool:
    """Nothing but its owner holds ``name``: no attachment, no extra handle, no service device."""
    e = entry(broker, name)
    return e is not None and not e["attachments"] and e["handles"] == handles and not flight_devices(broker)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
