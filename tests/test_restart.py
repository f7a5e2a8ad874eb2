"""Restart without loss: the broker under a (stand-in) service manager with an fd store.

The manager here records what systemd would: READY, STATUS, WATCHDOG and FDSTORE. It kills the
broker with SIGKILL, starts it again with the stored descriptors as LISTEN_FDS, and the
buffers, their names, their contents and the handles clients kept are all back.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import bufbroker
from bufbroker import Access, Direction

from manager import Manager


@pytest.fixture
def manager() -> Iterator[Manager]:
    directory = Path(tempfile.mkdtemp(prefix="bufbroker-manager-"))
    m = Manager(directory, flags=("--handshake-timeout", "5"), watchdog_usec=200_000)
    yield m
    m.close()
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _connect(m: Manager) -> bufbroker.Device:
    m.wait_for(lambda: os.path.exists(m.socket) and bool(m.said("READY")))
    return bufbroker.connect("client", socket=m.socket)


def test_ready_status_and_watchdog(manager: Manager) -> None:
    manager.start()
    with _connect(manager) as dev:
        dev.allocate(4096, name="x")
        manager.wait_for(lambda: any("1 buffers" in s for s in manager.said("STATUS")))
    manager.wait_for(lambda: len(manager.said("WATCHDOG")) >= 5)  # every 0.1 s for 0.2 s of WATCHDOG_USEC
    assert manager.said("READY") == ["1"]
    manager.kill(signal.SIGTERM)
    assert manager.said("STOPPING") == ["1"]


def test_sigkill_and_restart_keep_buffers_names_contents_and_handles(manager: Manager) -> None:
    manager.start()
    dev = _connect(manager)
    frame = dev.allocate(3 * 4096, name="frame-0")
    with frame.cpu_access(Access.WRITE) as mem:
        mem[:5] = b"hello"
        mem[-3:] = b"end"
    rw = frame.share()
    ro = frame.share(readonly=True)
    lazy = dev.allocate(4096, name="never-mapped")  # no memory yet: only its handle is stored
    lazy_handle = lazy.share()
    gone = dev.allocate(4096, name="released")
    gone.close()  # no handle anywhere: this one must not come back
    manager.wait_for(lambda: any(name.startswith("m.") for name in manager.stored()))
    manager.wait_for(lambda: not any(name.startswith(f"h.{gone.id}.") for name in manager.stored()))
    before = {b["id"]: (b["name"], b["size"], b["layout"]) for b in dev.buffers()}

    assert manager.kill() == -signal.SIGKILL
    dev.close()
    manager.start()
    with _connect(manager) as again:
        after = {b["id"]: (b["name"], b["size"], b["layout"]) for b in again.buffers()}
        assert after == before
        assert gone.id not in after
        restored = again.import_handle(rw)
        assert (restored.id, restored.name, restored.size) == (frame.id, "frame-0", 3 * 4096)
        with restored.attach() as att, att.map(Direction.TO_DEVICE) as m:
            assert bytes(m.memory[:5]) == b"hello" and bytes(m.memory[-3:]) == b"end"
        readonly = again.import_handle(ro)
        assert readonly.readonly is False  # the same device also holds it read-write now
        by_name = again.open("never-mapped")
        assert by_name.id == lazy.id
        with by_name.cpu_access(Access.READ) as mem:
            assert bytes(mem) == bytes(4096)
        fresh = again.allocate(4096)
        assert fresh.id > max(before)  # ids are never reused across the restart
    with bufbroker.connect("reader", socket=manager.socket) as other:
        view = other.import_handle(ro)
        assert view.readonly
        with pytest.raises(bufbroker.BrokerError) as e:
            view.cpu_access(Access.WRITE).begin()
        assert e.value.errno == errno.EACCES
    for fd in (rw, ro, lazy_handle):
        os.close(fd)
    with bufbroker.connect("observer", socket=manager.socket) as observer:
        manager.wait_for(lambda: observer.buffers() == [])
    manager.wait_for(lambda: not any(n.startswith(("m.", "h.")) for n in manager.stored()))


def test_without_a_manager_the_log_says_buffers_are_not_kept(broker) -> None:  # type: ignore[no-untyped-def]
    assert "not kept across a restart" in broker.log.read_text()
