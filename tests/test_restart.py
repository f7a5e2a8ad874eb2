"""Restart without loss: the broker under a (stand-in) service manager with an fd store.

The manager here records what systemd would: READY, STATUS, WATCHDOG and FDSTORE. It kills the
broker with SIGKILL, starts it again with the stored descriptors as LISTEN_FDS, and the
buffers, their names, their contents and the handles clients kept are all back.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import signal
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bufbroker
from bufbroker import Access, Direction

from conftest import Broker
from manager import Manager

WATCHDOG_USEC = 200_000


@pytest.fixture
def manager() -> Iterator[Manager]:
    directory = Path(tempfile.mkdtemp(prefix="bufbroker-manager-"))
    m = Manager(directory, flags=("--handshake-timeout", "5"), watchdog_usec=WATCHDOG_USEC)
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
    # Pings come at half of WATCHDOG_USEC (0.1 s here): judged by the median interval, with room
    # on both sides for a loaded machine, but not for a broker pinging at a fixed rate of its own.
    manager.wait_for(lambda: len(manager.when("WATCHDOG")) >= 12)
    pings = manager.when("WATCHDOG")
    intervals = [b - a for a, b in itertools.pairwise(pings)]
    period = WATCHDOG_USEC / 1e6
    assert 0.3 * period <= statistics.median(intervals) <= 0.8 * period, intervals
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
    # The snapshot (names, layouts) is rewritten a moment after the changes: kill after it.
    manager.wait_for(lambda: manager.snapshot_names() == {frame.id: "frame-0", lazy.id: "never-mapped"})
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


def test_a_snapshot_that_cannot_be_made_costs_no_service(manager: Manager) -> None:
    """Regression: EMFILE from the snapshot's memfd_create used to stop the broker."""
    manager.start()
    with _connect(manager) as dev:
        buf = dev.allocate(4096, name="before")
        handle = buf.share()
        manager.wait_for(lambda: manager.snapshot_names().get(buf.id) == "before")
        assert manager.proc is not None
        pid = manager.proc.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # A soft limit at the lowest free descriptor number: the (idle) broker can open no more.
        open_now = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(open_now) + 1)) - open_now)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))
        try:
            buf.set_name("during")  # a change: the new snapshot's memfd_create fails with EMFILE
            manager.wait_for(lambda: "cannot write the snapshot" in manager.log())
            dev.ping()
            assert manager.proc.poll() is None
            assert manager.snapshot_names()[buf.id] == "before"  # the last good one stays
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        buf.set_name("after")  # the next change writes it
        manager.wait_for(lambda: manager.snapshot_names().get(buf.id) == "after")
    assert "Too many open files" in manager.log()
    assert manager.log().count("cannot write the snapshot") == 1
    assert manager.kill() == -signal.SIGKILL
    manager.start()
    with _connect(manager) as again:
        assert again.import_handle(handle).name == "after"
    os.close(handle)


def test_without_a_manager_the_log_says_buffers_are_not_kept(broker: Broker) -> None:
    assert "not kept across a restart" in broker.log.read_text()
    with broker.connect() as dev:
        held = dev.allocate(8192)  # kept referenced: a Buffer that is collected is released
        handle = dev.allocate(4096).share()
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(10) == 0
        del held
    os.close(handle)
    assert (
        "WARNING: stopping with 2 buffers (12288 bytes): they are not kept, there is no service "
        "manager with a file descriptor store" in broker.log.read_text()
    )


def test_a_restart_under_a_manager_without_a_store_says_buffers_were_not_kept(manager: Manager) -> None:
    manager.fdstore = False  # FileDescriptorStoreMax=0: FDSTORE=1 is ignored, nothing comes back
    manager.start()
    dev = _connect(manager)
    buf = dev.allocate(4096, name="lost")
    handle = buf.share()
    other = bufbroker.connect("other", socket=manager.socket)
    mine = dev.allocate(4096)
    shared = mine.share()
    theirs = other.import_handle(shared)  # held by the other device only, once the handles close
    os.close(shared)
    mine.close()
    manager.wait_for(lambda: [b["handles"] for b in dev.buffers()] == [2, 0])
    assert manager.kill(signal.SIGTERM) == 0
    del theirs
    other.close()
    dev.close()
    stop = (
        "stopping with 2 buffers (8192 bytes): 1 held by handles stay in the service manager's file "
        "descriptor store for a restart, if the unit sets FileDescriptorStoreMax=; 1 held only by "
        "devices are freed"
    )
    assert stop in manager.log()
    manager.start()
    with _connect(manager) as again:
        assert again.buffers() == []
        with pytest.raises(bufbroker.BrokerError) as e:
            again.import_handle(handle)
        assert e.value.errno == errno.EINVAL
    os.close(handle)
    restarted = manager.log().split(stop, 1)[1]
    assert "if this is a restart, the buffers of the previous broker were not kept" in restarted
    assert manager.stored() == []


def test_a_manager_that_tells_its_store_size_hears_of_an_empty_store(manager: Manager) -> None:
    manager.env["FDSTORE"] = "64"  # systemd 254 and later: FileDescriptorStoreMax=, when not 0
    manager.start()
    with _connect(manager) as dev:
        dev.allocate(4096).share()
        assert manager.kill(signal.SIGTERM) == 0
    log = manager.log()
    assert "the file descriptor store (room for 64) is empty: no buffers to restore" in log
    assert "were not kept" not in log
    assert "1 held by handles stay in the service manager's file descriptor store for a restart" in log


def test_an_exporters_buffer_comes_back_revoked(manager: Manager, exporter: Any) -> None:
    manager.start()
    manager.wait_for(lambda: os.path.exists(manager.socket) and bool(manager.said("READY")))
    peer = exporter(manager, "supplied")  # type: ignore[arg-type]
    dev = _connect(manager)
    buf = dev.open("supplied")
    handle = buf.share()
    manager.wait_for(lambda: manager.snapshot_names().get(buf.id) == "supplied")
    assert manager.kill() == -signal.SIGKILL
    dev.close()
    peer.stop()
    manager.start()
    with _connect(manager) as again:
        restored = again.import_handle(handle)
        assert restored.revoked and restored.heap == "exporter"
        with pytest.raises(bufbroker.BrokerError) as e:
            restored.attach()
        assert e.value.errno == errno.ENODEV  # never memory of the broker's own in its place
        restored.close()
    os.close(handle)
