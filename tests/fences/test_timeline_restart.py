"""Timelines across a broker restart: kept in the fd store, as buffers are.

Signals and waits go on while the broker is down; the handles clients kept import again; a
promised point gets a new max_fence_time; a signaller whose process ended meanwhile fails its
timeline with ESRCH.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import bufbroker

from conftest import Peer
from fence_fixtures import channel, fence_peer
from manager import Manager

__all__ = ["channel", "fence_peer"]


@pytest.fixture
def manager() -> Iterator[Manager]:
    directory = Path(tempfile.mkdtemp(prefix="bufbroker-manager-"))
    m = Manager(directory, flags=("--max-fence-time", "3"))
    yield m
    m.close()
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _connect(m: Manager, name: str = "client") -> bufbroker.Device:
    m.wait_for(lambda: os.path.exists(m.socket) and bool(m.said("READY")))
    return bufbroker.connect(name, socket=m.socket)


def test_a_restart_keeps_timelines_and_signals_go_on_meanwhile(
    manager: Manager,
    fence_peer: Callable[..., Peer],
    channel,  # type: ignore[no-untyped-def]
) -> None:
    manager.start()
    dev = _connect(manager, "signaller")
    tl = dev.timeline(name="frame-done")
    tl.signal(2)
    tl.fence(9).close()  # a promise, never kept
    handle = tl.share()
    # A second timeline whose signaller's process ends while the broker is down.
    ours, theirs = channel()
    doomed = fence_peer("signaller", manager.socket, theirs.fileno(), 1, pass_fds=(theirs.fileno(),))
    doomed_handle = bufbroker.recv_handle(ours)
    assert doomed.line()
    manager.wait_for(lambda: sum(n.startswith("th.") for n in manager.stored()) == 2)
    manager.wait_for(lambda: len((manager.snapshot() or {}).get("timelines", [])) == 2)

    assert manager.kill() == -signal.SIGKILL
    tl.signal(3)  # no broker needed
    doomed.send("end")
    assert doomed.finish() == 0
    manager.start()
    with _connect(manager, "waiter") as again:
        [kept, lost] = again.timelines()
        assert (kept["id"], kept["name"], kept["value"], kept["promised"]) == (tl.id, "frame-done", 3, 9)
        assert not kept["signaller"]["alive"] and kept["error"] == 0
        assert lost["error"] == errno.ESRCH
        waiter = again.import_timeline(handle)
        waiter.wait(3, timeout=5)
        tl.signal(4)  # the signaller's page still works, from its old mapping
        waiter.wait(4, timeout=5)
        with pytest.raises(bufbroker.BrokerError) as e:
            waiter.wait(9, timeout=30)  # the promise gets max_fence_time again, from the restart
        assert e.value.errno == errno.ETIMEDOUT
        other = again.import_timeline(doomed_handle)
        with pytest.raises(bufbroker.BrokerError) as e:
            other.wait(1, timeout=5)
        assert e.value.errno == errno.ESRCH
        assert again.timeline().id > lost["id"]  # ids are never reused across the restart
    dev.close()
    os.close(handle)
    os.close(doomed_handle)
    with bufbroker.connect("observer", socket=manager.socket) as observer:
        manager.wait_for(lambda: observer.timelines() == [])
    manager.wait_for(lambda: not any(n.startswith(("t.", "e.", "th.")) for n in manager.stored()))
