"""bufbrokerd as a process: its socket file, signals, flags, a second instance, its descriptor
limit, and a service manager that stops listening."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import bufbroker
from bufbroker.protocol import fds_from_ancillary

from conftest import Broker, RawClient, start_broker

MAIN = "from bufbroker.broker._main import main; raise SystemExit(main())"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_cleanly_and_remove_the_socket(broker: Broker, signum: int) -> None:
    with broker.connect() as dev:
        dev.allocate(4096)
        broker.proc.send_signal(signum)
        assert broker.proc.wait(10) == 0
    assert not os.path.exists(broker.socket)
    assert "shutting down" in broker.log.read_text()


def test_refuses_a_live_brokers_socket(broker: Broker) -> None:
    second = subprocess.run(
        [sys.executable, "-c", MAIN, "--socket", broker.socket], capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 1
    assert "already serving" in second.stderr
    with broker.connect() as dev:  # the first one is untouched
        dev.ping()


def test_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "bufbroker.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    b = start_broker(tmp_path)
    try:
        with b.connect() as dev:
            dev.ping()
    finally:
        assert b.stop() == 0


def test_does_not_touch_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "bufbroker.sock"
    path.write_text("precious")
    result = subprocess.run(
        [sys.executable, "-c", MAIN, "--socket", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert path.read_text() == "precious"


def test_limit_flags_reach_the_broker(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory("--max-buffers-per-uid", "7", "--max-buffer-size", "1M", "--handshake-timeout", "2.5")
    with b.connect() as dev:
        limits = dev.stats()["limits"]
    assert limits["max_buffers_per_uid"] == 7
    assert limits["max_buffer_size"] == 1 << 20
    assert limits["handshake_timeout"] == 2.5


def test_missing_broker_is_a_clear_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody-home.sock")
    with pytest.raises(bufbroker.BrokerUnavailable) as e:
        bufbroker.connect("x", socket=path)
    assert path in str(e.value) and "bufbrokerd" in str(e.value)
    assert isinstance(e.value, OSError)


def test_importing_the_client_does_not_import_trio() -> None:
    code = "import sys, bufbroker, bufbroker.client; assert 'trio' not in sys.modules, 'trio imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_devices_hear_of_a_shutdown(broker: Broker, raw: Callable[[Broker], RawClient]) -> None:
    c = raw(broker)
    c.hello()
    broker.proc.send_signal(signal.SIGTERM)
    assert c.recv() == [3, "shutdown", {}]
    assert c.recv() is None
    assert broker.proc.wait(10) == 0


def _open_files_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process, as the kernel reports it."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line[len("Max open files") :].split()[:2]
    return int(soft), int(hard)


def test_raises_its_descriptor_limit_to_the_hard_limit(broker_factory: Callable[..., Broker]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(1024, hard - 1)  # start it below the hard limit, whatever ours is
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        b = broker_factory()  # inherits the lowered soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _open_files_limit(b.pid) == (hard, hard)
    assert f"descriptor limit raised to {hard}" in b.log.read_text()


def _notification(manager: socket.socket) -> list[str]:
    """The lines of the next notification (its descriptors closed); [] if none is waiting."""
    try:
        data, ancdata, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(16))
    except BlockingIOError:
        return []
    for fd in fds_from_ancillary(ancdata, 0, 4):
        os.close(fd)
    return data.decode().splitlines()


def test_a_stalled_service_manager_does_not_freeze_the_broker(
    broker_factory: Callable[..., Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: notifications are sent from the trio thread, and a manager that stopped
    reading its socket blocked the broker for good; now each send gives up after a timeout."""
    address = f"\0bufbroker-stalled-{os.getpid()}"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(address)
    manager.settimeout(30)
    stuffer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuffer.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + address[1:])
    try:
        broker = broker_factory()
        while "READY=1" not in _notification(manager):
            pass
        # The manager stops reading: its queue fills up, and every later send would block.
        while True:
            try:
                stuffer.sendto(b"X=1", address)
            except BlockingIOError:
                break
        with broker.connect("while-stalled") as dev:  # a new device changes STATUS=
            broker.wait_for(lambda: "cannot notify the service manager" in broker.log.read_text(), 30)
            dev.ping()
            assert [d["name"] for d in dev.devices()] == ["while-stalled"]
            # The manager reads again: what the broker says from now on arrives.
            manager.setblocking(False)
            while _notification(manager):
                pass
            manager.settimeout(30)
            dev.allocate(4096)  # its handle goes to the fd store
            while not any(line.startswith("FDNAME=h.") for line in _notification(manager)):
                pass
        assert broker.proc.poll() is None
    finally:
        stuffer.close()
        manager.close()
