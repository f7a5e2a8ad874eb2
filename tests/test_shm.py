"""The shm heap: named POSIX shared memory outlives a broker killed with SIGKILL, and only its
owner's uid may write it (it cannot be sealed against shrinking)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import posix_ipc
import pytest

from bufbroker import Access, Direction
from bufbroker.broker._shm import prefix_for

from conftest import Broker, Peer, start_broker
from peer import pattern


@pytest.fixture
def place() -> Iterator[Path]:
    """A broker's directory that outlives one broker, and its shm objects cleaned up after."""
    directory = Path(tempfile.mkdtemp(prefix="bufbroker-test-"))
    os.chmod(directory, 0o755)
    yield directory
    stem = prefix_for(str(directory / "bufbroker.sock")).lstrip("/")
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(stem):
            os.unlink(f"/dev/shm/{entry}")
    shutil.rmtree(directory, ignore_errors=True)


def _objects(broker: Broker) -> set[str]:
    stem = prefix_for(broker.socket).lstrip("/")
    return {entry for entry in os.listdir("/dev/shm") if entry.startswith(stem)}


def test_shm_buffers_survive_a_broker_killed_and_are_adopted_again(place: Path) -> None:
    first = start_broker(place, "--shm-adopted-hold", "1.5")
    second: Broker | None = None
    foreign = posix_ipc.SharedMemory("/bufbroker-test-not-ours", posix_ipc.O_CREAT, size=4096)
    foreign.close_fd()
    try:
        dev = first.connect("maker")
        kept = dev.allocate(10_000, name="kept", heap="shm")
        with kept.cpu_access(Access.WRITE) as mem:
            mem[:] = pattern(10_000)
        unnamed = dev.allocate(4096, heap="shm")
        with unnamed.cpu_access(Access.WRITE) as mem:
            mem[:4] = b"lost"
        dev.allocate(4096, name="never-mapped", heap="shm")  # no memory yet: nothing to keep
        old = kept.attach().map(Direction.BIDIRECTIONAL)  # a mapping that outlives the broker
        assert len(_objects(first)) == 4  # two objects, two records
        stem = prefix_for(first.socket)
        stray = posix_ipc.SharedMemory(f"{stem}999-00000000", posix_ipc.O_CREX, size=4096)
        stray.close_fd()
        orphan = posix_ipc.SharedMemory(f"{stem}998-00000000.r", posix_ipc.O_CREX, size=16)
        orphan.close_fd()

        first.proc.kill()
        first.proc.wait()
        second = start_broker(place, "--shm-adopted-hold", "1.5")
        with second.connect("user") as again:
            listed = {b["name"]: b for b in again.buffers()}
            assert set(listed) == {"kept", None}  # the never-mapped one had nothing to keep
            assert listed["kept"]["id"] == kept.id and listed["kept"]["size"] == 10_000
            assert len(_objects(second)) == 4  # the stray object and the orphan record are gone
            assert os.path.exists("/dev/shm/bufbroker-test-not-ours")  # another prefix: not touched
            buf = again.open("kept")
            with buf.cpu_access(Access.RW) as mem:
                assert bytes(mem) == pattern(10_000)
                mem[:3] = b"new"
            assert bytes(old.memory[:3]) == b"new"  # the same memory as the dead broker's mapping
            # After the hold, what nobody opened is freed, and its objects removed.
            second.wait_for(lambda: [b["name"] for b in again.buffers()] == ["kept"])
            assert len(_objects(second)) == 2
            buf.close()
            second.wait_for(lambda: not _objects(second))
        old.memory.release()
        dev.close()
    finally:
        posix_ipc.unlink_shared_memory("/bufbroker-test-not-ours")
        first.stop()
        if second is not None:
            second.stop()


def test_only_the_owner_uid_writes_shm(
    broker: Broker, peer: Callable[..., Peer], other_uid: int
) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(8192, heap="shm")
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:] = pattern(8192)
        handle = buf.share()
        stranger = peer("map_as", broker.socket, other_uid, handle, pass_fds=(handle,))
        os.close(handle)
        seen = json.loads(stranger.line())
        stranger.finish()
        digest = hashlib.sha256(pattern(8192)).hexdigest()
        assert seen == {"to_device": digest, "from_device": errno.EACCES, "bidirectional": errno.EACCES}
        with broker.connect("same-uid") as mine:  # another device of the owner's uid may write
            fd = buf.share()
            other = mine.import_handle(fd)
            os.close(fd)
            with other.cpu_access(Access.WRITE) as mem:
                mem[:2] = b"ok"
            other.close()
    broker.wait_for(lambda: not _objects(broker))


def test_shm_cannot_be_sealable(broker: Broker) -> None:
    with broker.connect() as dev:
        with pytest.raises(OSError) as e:
            dev.allocate(4096, heap="shm", sealable=True)
        assert e.value.errno == errno.EINVAL
