"""The shm heap: named POSIX shared memory (through posix_ipc), which outlives the broker.

Each buffer's backing is an object ``<prefix><id>-<token>`` and beside it a small record,
``<prefix><id>-<token>.r`` (msgpack: what the buffer is: size, owner, name, exporter, layout),
rewritten when the buffer is laid out or renamed. The prefix is the broker's own, derived from
its socket's path, so brokers on other sockets never touch these objects. Both are mode 0600,
owned by the broker's uid.

When a broker starts, it adopts every object of its prefix that a record explains and that
its uid owns: the buffer comes back with its id, name and bytes, and the broker itself holds
it for a while (``shm_adopted_hold``), time for its users to open it again by name; objects no record explains
(a crash between the two writes, a damaged record) are removed. Without systemd's fd store,
handles do not survive a broker (their other ends died with it), so names are the way back.

POSIX shared memory cannot be sealed: any holder of a writable descriptor could ftruncate it
and make every other process's mapping SIGBUS. So only the owner's uid gets writable mappings
(``Heap.shared_writers``); other uids map it read-only (their descriptors are O_RDONLY, and
mode 0600 stops a reopen), and a seal is refused (EINVAL).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
from typing import Any

import msgpack
import posix_ipc

from ..protocol import BrokerError
from ._heap import Backing
from ._heaps import Heap
from ._layout import Layout
from ._records import Buffer, Handle
from ._state import Observer, State

__all__ = ["ShmBacking", "ShmHeap", "ShmRecords", "adopt", "prefix_for"]

log = logging.getLogger("bufbroker.broker")

SHM_DIR = "/dev/shm"  # where glibc's shm_open keeps the objects: the only way to list them
_RECORD = ".r"
_RECORD_MOST = 4096  # a record is small; a larger one is not ours


def prefix_for(socket_path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:16]
    return f"/bufbroker.{digest}."


def _unlink(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError, OSError):
        posix_ipc.unlink_shared_memory(name)


class ShmBacking(Backing):
    """A named object: freeing the buffer removes it and its record."""

    __slots__ = ("name",)

    def __init__(self, fd: int, size: int, *, name: str, lazy: bool = True) -> None:
        super().__init__(fd, size, lazy=lazy)
        self.name = name

    def close(self) -> None:
        super().close()
        _unlink(self.name)
        _unlink(self.name + _RECORD)


def _open(name: str, flags: int, size: int = 0) -> int:
    """A descriptor of shm object ``name`` (posix_ipc's own is closed: ours outlives it)."""
    shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=size)
    try:
        return os.dup(shm.fd)
    finally:
        shm.close_fd()


class ShmHeap(Heap):
    name = "shm"
    sealable = False
    shared_writers = False
    commits = True

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def unavailable(self) -> str | None:
        if not os.access(SHM_DIR, os.W_OK | os.X_OK):
            return f"{SHM_DIR} is missing or not writable"
        return None

    def allocate(self, buffer: Buffer) -> Backing:
        """The object and its (empty) record, both made here (O_EXCL): /dev/shm is writable by
        every user, and a record someone else made first must never be the one written to."""
        name = f"{self.prefix}{buffer.id}-{secrets.token_hex(4)}"
        try:
            fd = _open(name, posix_ipc.O_CREX, buffer.span)
        except (posix_ipc.Error, OSError) as e:
            raise BrokerError(errno.ENOMEM, f"cannot create shared memory {name}: {e}") from None
        try:
            os.close(_open(name + _RECORD, posix_ipc.O_CREX))
        except (posix_ipc.Error, OSError) as e:
            os.close(fd)
            _unlink(name)  # the record's name was taken: by a squatter, or a crash long ago
            raise BrokerError(errno.ENOMEM, f"cannot create the record of {name}: {e}") from None
        return ShmBacking(fd, buffer.span, name=name)

    def pool(self) -> dict[str, Any]:
        st = os.statvfs(SHM_DIR)
        return {
            "path": SHM_DIR,
            "size_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
        }

    def short(self, span: int) -> str:
        return f"{SHM_DIR} has no room for {span} more bytes"


def _record(buffer: Buffer) -> dict[str, Any]:
    return {
        "version": 1,
        "id": buffer.id,
        "size": buffer.size,
        "span": buffer.span,
        "owner": buffer.owner,
        "name": buffer.name,
        "exporter": list(buffer.exporter),
        "created": buffer.created,
        "layout": None if buffer.layout is None else [buffer.layout.size, buffer.layout.length],
    }


class ShmRecords(Observer):
    """Keeps each shm buffer's record up to date; passes everything on to ``inner``."""

    def __init__(self, state: State, inner: Observer) -> None:
        self._state = state
        self._inner = inner

    def handle_added(self, handle: Handle) -> None:
        self._inner.handle_added(handle)

    def handle_removed(self, handle: Handle) -> None:
        self._inner.handle_removed(handle)

    def changed(self, buffer: Buffer) -> None:
        self._inner.changed(buffer)
        backing = buffer.backing
        if isinstance(backing, ShmBacking) and buffer.id in self._state.buffers:
            data = msgpack.packb(_record(buffer))
            try:
                fd = _open(backing.name + _RECORD, 0)  # made with the object, by us
                try:
                    if os.fstat(fd).st_uid != os.geteuid():
                        raise OSError(errno.EPERM, "the record is not the broker's own")
                    os.ftruncate(fd, len(data))
                    os.pwrite(fd, data, 0)
                finally:
                    os.close(fd)
            except (posix_ipc.Error, OSError) as e:
                log.warning("cannot record shm buffer %d (a restart would lose it): %s", buffer.id, e)


def _read_record(name: str) -> dict[str, Any] | None:
    try:
        fd = _open(name + _RECORD, 0)
    except (posix_ipc.Error, OSError):
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_size > _RECORD_MOST:
            return None
        record = msgpack.unpackb(os.pread(fd, st.st_size, 0))
        return record if isinstance(record, dict) and record.get("version") == 1 else None
    except Exception:
        return None
    finally:
        os.close(fd)


def adopt(heap: ShmHeap, state: State) -> int:
    """Bring back the buffers of this prefix's objects; remove what no record explains.

    Returns how many came back. Runs at start, before any client connects.
    """
    stem = heap.prefix.lstrip("/")
    try:
        names = sorted("/" + entry for entry in os.listdir(SHM_DIR) if entry.startswith(stem))
    except OSError as e:
        log.warning("cannot look for shared memory left by an earlier broker: %s", e)
        return 0
    backings = [n for n in names if not n.endswith(_RECORD)]
    explained = set()
    adopted = 0
    for name in backings:
        record = _read_record(name)
        if record is None or not _restore(name, record, state):
            log.info("removing shared memory %s: no record explains it", name)
            _unlink(name)
            continue
        explained.add(name + _RECORD)
        adopted += 1
    for name in names:
        if name.endswith(_RECORD) and name not in explained:
            _unlink(name)
    if adopted:
        log.info("adopted %d shm buffers left by an earlier broker", adopted)
    return adopted


def _restore(name: str, record: dict[str, Any], state: State) -> bool:
    try:
        fd = _open(name, 0)
    except (posix_ipc.Error, OSError):
        return False
    try:
        st = os.fstat(fd)
        id, size, span, owner = (int(record[key]) for key in ("id", "size", "span", "owner"))
        if st.st_uid != os.geteuid() or st.st_size != span or not 0 < size <= span or min(id, owner) < 0:
            raise ValueError("not ours, or not the size the record says")
        backing = ShmBacking(fd, span, name=name)
        existing = state.buffers.get(id)
        if existing is not None:  # came back through the fd store too: the same object
            if existing.heap != "shm" or existing.backing is None:
                raise ValueError("another buffer has its id")
            state.free(existing.backing)
            existing.backing = backing
            return True
        name_ = record.get("name")
        device, label, pid = record.get("exporter") or (0, "?", 0)
        raw = record.get("layout")
        layout = None if raw is None else Layout(int(raw[0]), int(raw[1]))
        if layout is not None and (layout.size != span or not 0 < layout.length <= span):
            raise ValueError("a layout that does not cover the object")
        buffer = state.restore(
            id=id,
            size=size,
            span=span,
            owner=owner,
            heap="shm",
            name=name_ if isinstance(name_, str) else None,
            exporter=(int(device), str(label), int(pid)),
            created=float(record.get("created") or state.clock()),
            backing=backing,
            layout=layout,
        )
        buffer.kept = True
        return True
    except (KeyError, TypeError, ValueError, IndexError, BrokerError):
        os.close(fd)
        return False
