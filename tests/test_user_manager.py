"""The user units under a real systemd user manager (systemd is not PID 1 on these machines).

In a private mount namespace, a tmpfs on /run/systemd with /run/systemd/system in it makes
``systemd --user`` believe the system was booted with systemd; with its own XDG_RUNTIME_DIR it
then manages our units for real: socket activation, READY and STATUS, restarts with the fd
store, and the watchdog.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_systemd_units import install

import bufbroker
from bufbroker import Access

SETUP = (
    "mount -t tmpfs tmpfs /run/systemd && mkdir -p /run/systemd/system && exec /lib/systemd/systemd --user"
)


def _unshare_refused() -> str | None:
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True
    )
    return probe.stderr.strip() or f"exit {probe.returncode}" if probe.returncode else None


class UserManager:
    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self.socket = str(runtime / "bufbroker" / "bufbroker.sock")
        self.log = (runtime / "manager.log").open("w")
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", SETUP],
            env=env,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        self.wait_for(lambda: (runtime / "systemd" / "private").exists(), "the user manager to start")

    def systemctl(self, *args: str) -> str:
        """systemctl --user, run inside the manager's mount namespace."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "systemctl", "--user", "--no-pager", *args],
            env={**os.environ, "XDG_RUNTIME_DIR": str(self.runtime)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout + result.stderr

    def main_pid(self) -> int:
        return int(self.systemctl("show", "-p", "MainPID", "--value", "bufbroker.service").strip() or 0)

    def restarts(self) -> int:
        return int(self.systemctl("show", "-p", "NRestarts", "--value", "bufbroker.service").strip())

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def wait_for_new_broker(self, old: int) -> int:
        self.wait_for(lambda: self.main_pid() not in (0, old), "a new broker process")
        self.wait_for(lambda: "Status:" in self.systemctl("status", "bufbroker.service"), "READY and STATUS")
        return self.main_pid()

    def stop(self) -> None:
        broker = 0
        # A manager that no longer answers must still be ended below, not leaked.
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            broker = self.main_pid() if self.proc.poll() is None else 0
            self.systemctl("stop", "bufbroker.service", "bufbroker.socket")
        if broker and Path(f"/proc/{broker}").exists():
            os.kill(broker, signal.SIGKILL)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def _user_manager(dropin: str = "") -> Iterator[UserManager]:
    """A user manager with our user units, and ``dropin`` ([Service] lines, ``{runtime}`` filled in)."""
    refused = _unshare_refused()
    if refused:
        pytest.skip(f"this machine refuses unshare -m ({refused}): no private systemd user manager here")
    runtime = Path(tempfile.mkdtemp(prefix="bufbroker-xdg-"))
    os.chmod(runtime, 0o700)
    units = runtime / "systemd" / "user"
    units.mkdir(parents=True)
    install(units, user=True, watchdog="2s")
    # Every such manager takes the cgroup tree's root as its own (it starts in /init.scope), so
    # the broker of each would be /app.slice/bufbroker.service, and a manager stopping its broker
    # would kill the broker of a test running beside it. A slice of its own keeps them apart.
    slice_name = "bufbrokertest" + runtime.name.removeprefix("bufbroker-xdg-") + ".slice"
    (units / "bufbroker.service.d").mkdir()
    (units / "bufbroker.service.d" / "test.conf").write_text(
        f"[Service]\nSlice={slice_name}\n" + dropin.format(runtime=runtime)
    )
    manager = UserManager(runtime)
    try:
        yield manager
    finally:
        manager.stop()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def user_manager() -> Iterator[UserManager]:
    with _user_manager() as manager:
        yield manager


def _contents(socket: str, handle: int) -> bytes:
    with bufbroker.connect("checker", socket=socket) as dev:
        buf = dev.import_handle(handle)
        assert buf.name == "kept"
        with buf.cpu_access(Access.READ) as mem:
            data = bytes(mem[:6])
        buf.close()
        return data


def test_activation_readiness_restart_kill_and_watchdog(user_manager: UserManager) -> None:
    m = user_manager
    assert "active (listening)" in m.systemctl("start", "bufbroker.socket") + m.systemctl(
        "status", "bufbroker.socket"
    )
    assert m.main_pid() == 0  # nothing runs until somebody connects

    with bufbroker.connect("producer", socket=m.socket) as dev:  # activation on first connect
        buf = dev.allocate(8192, name="kept")
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:6] = b"frame!"
        handle = buf.share()
    first = m.main_pid()
    m.wait_for(lambda: "1 buffers" in m.systemctl("status", "bufbroker.service"), "STATUS with the buffer")
    status = m.systemctl("status", "bufbroker.service")
    assert "active (running)" in status  # Type=notify: only after READY=1

    m.systemctl("restart", "bufbroker.service")
    second = m.wait_for_new_broker(first)
    assert _contents(m.socket, handle) == b"frame!"

    os.kill(second, signal.SIGKILL)  # Restart=on-failure brings it back, with the fd store
    third = m.wait_for_new_broker(second)
    assert _contents(m.socket, handle) == b"frame!"

    restarts = m.restarts()
    os.kill(third, signal.SIGSTOP)  # stops pinging: only the watchdog (2 s) can end it now
    m.wait_for_new_broker(third)
    assert not Path(f"/proc/{third}").exists() and m.restarts() == restarts + 1
    assert _contents(m.socket, handle) == b"frame!"
    os.close(handle)


def test_a_restart_without_a_store_says_in_the_log_that_buffers_were_not_kept() -> None:
    dropin = "FileDescriptorStoreMax=0\nStandardError=append:{runtime}/broker.log\n"
    with _user_manager(dropin) as m:
        m.systemctl("start", "bufbroker.socket")
        with bufbroker.connect("producer", socket=m.socket) as dev:
            handle = dev.allocate(8192, name="kept").share()
        first = m.main_pid()
        m.wait_for(
            lambda: "1 buffers" in m.systemctl("status", "bufbroker.service"), "STATUS with the buffer"
        )
        m.systemctl("restart", "bufbroker.service")
        m.wait_for_new_broker(first)
        with bufbroker.connect("checker", socket=m.socket) as dev:
            assert dev.buffers() == []
            with pytest.raises(bufbroker.BrokerError) as e:
                dev.import_handle(handle)
            assert e.value.errno == errno.EINVAL
        os.close(handle)
        log = (m.runtime / "broker.log").read_text()
    # systemd 252 does not tell the broker the store's size ($FDSTORE comes with 254)
    stop = "stopping with 1 buffers (8192 bytes): 1 held by handles stay in the service manager's"
    assert stop in log and "if the unit sets FileDescriptorStoreMax=" in log, log
    after_restart = log.split(stop, 1)[1]
    assert "if this is a restart, the buffers of the previous broker were not kept" in after_restart, log
