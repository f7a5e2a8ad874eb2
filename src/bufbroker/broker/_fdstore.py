"""Buffers that survive a broker restart, through systemd's file descriptor store.

While the broker runs under a service manager, it stores (FDSTORE=1) each buffer's backing
memfd and its own end of every live handle, and removes them (FDSTOREREMOVE=1) as they die.
When the manager starts it again, it hands them back as LISTEN_FDS with their names; the
handles that clients kept are still the other ends of those sockets, so they import again.

What a buffer is can be read from the names alone, so that a crash between two stores loses
nothing essential::

    m.<id>                                         the backing memfd of buffer <id>
    h.<id>.<owner>.<size>.<r|w>.<uid>.<ino>.<key>  the broker's end of a handle minted for <uid>
                                                   (<key>: its cookie, <ino>: its client end's inode)
    s.<generation>                                 a sealed memfd: msgpack snapshot of the buffers

Timelines are stored beside them (``_fdstore_timelines``). The snapshot adds what names cannot
carry (buffer and timeline names, layouts, exporters, signallers, creation times).
It is rewritten, with a new generation, whenever a buffer is created, named, laid out or freed;
the newest one wins and older ones are removed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import trio

from ..protocol import Segment
from ._fdstore_timelines import TimelineStore, describe_timeline, is_timeline_stored, restore_timelines
from ._handles import HandleTable
from ._heap import Backing, seal_snapshot
from ._layout import Layout
from ._records import Buffer, Handle
from ._state import Observer, State

__all__ = ["FdStore", "Notifier", "is_stored", "restore"]

log = logging.getLogger("bufbroker.broker")

SNAPSHOT_RETRY = 5.0  # seconds before a failed snapshot is tried again when nothing changes

_HANDLE = re.compile(r"h\.(\d+)\.(\d+)\.(\d+)\.([rw])\.(\d+)\.(\d+)\.(\d+)")
_MEMFD = re.compile(r"m\.(\d+)")
_SNAPSHOT = re.compile(r"s\.(\d+)")


def is_stored(name: str) -> bool:
    """Whether an inherited descriptor's name is one of ours from the fd store."""
    return any(pattern.fullmatch(name) for pattern in (_HANDLE, _MEMFD, _SNAPSHOT)) or is_timeline_stored(
        name
    )


class Notifier(Protocol):
    def fdstore(self, fds: list[int], name: str) -> None: ...

    def fdstore_remove(self, name: str) -> None: ...


def _handle_name(handle: Handle, ino: int) -> str:
    b = handle.buffer
    return f"h.{b.id}.{b.owner}.{b.size}.{'r' if handle.readonly else 'w'}.{handle.uid}.{ino}.{handle.key}"


class FdStore(Observer):
    """The state model's observer that mirrors buffers and handles into the fd store."""

    def __init__(self, notifier: Notifier, state: State, handles: HandleTable, generation: int = 0) -> None:
        self._notifier = notifier
        self._state = state
        self._handles = handles
        self._memfds = {b.id for b in state.buffers.values() if b.backing is not None}
        # The stored name of each live handle (its client end's inode is in it, and the
        # broker's end is closed by the time the handle is reported gone).
        self._names = {
            h.key: _handle_name(h, handles.ino_of(h.key))
            for h in state.handles.values()
            if handles.end_of(h.key) is not None
        }
        self._generation = generation
        self._dirty = trio.Event()
        self._dirty.set()  # write a first snapshot at once
        self.timelines = TimelineStore(notifier, state, handles, lambda: self._dirty.set())

    def handle_added(self, handle: Handle) -> None:
        fd = self._handles.end_of(handle.key)
        if fd is not None:
            name = _handle_name(handle, self._handles.ino_of(handle.key))
            self._names[handle.key] = name
            self._notifier.fdstore([fd], name)

    def handle_removed(self, handle: Handle) -> None:
        name = self._names.pop(handle.key, None)
        if name is not None:
            self._notifier.fdstore_remove(name)

    def changed(self, buffer: Buffer) -> None:
        alive = buffer.id in self._state.buffers
        if alive and buffer.backing is not None and buffer.id not in self._memfds:
            self._notifier.fdstore([buffer.backing.fd], f"m.{buffer.id}")
            self._memfds.add(buffer.id)
        elif not alive and buffer.id in self._memfds:
            self._notifier.fdstore_remove(f"m.{buffer.id}")
            self._memfds.discard(buffer.id)
        self._dirty.set()

    async def run(self) -> None:
        """Rewrite the snapshot after changes, once per burst of them.

        A snapshot that cannot be made (EMFILE, ENOMEM, ...) costs only the names and layouts a
        restart would bring back: the broker goes on serving, and tries again at the next change,
        or after ``SNAPSHOT_RETRY`` seconds if no change comes first.
        """
        failing = False
        while True:
            with trio.move_on_after(SNAPSHOT_RETRY if failing else math.inf):
                await self._dirty.wait()
            self._dirty = trio.Event()
            try:
                self._write_snapshot()
            except OSError as e:
                if not failing:  # once per run of failures, not once per retry
                    log.warning(
                        "cannot write the snapshot for the file descriptor store: %s; until it is "
                        "written, a restart brings back names and layouts as of the last one (retrying)",
                        e,
                    )
                failing = True
            else:
                if failing:
                    log.info("the snapshot for the file descriptor store is written again")
                failing = False

    def _write_snapshot(self) -> None:
        data = msgpack.packb(
            {
                "version": 1,
                "buffers": [_describe(b) for b in self._state.buffers.values()],
                "timelines": [describe_timeline(t) for t in self._state.sync.timelines.values()],
            }
        )
        fd = seal_snapshot(data)  # may raise OSError: run() logs it and retries
        try:
            self._notifier.fdstore([fd], f"s.{self._generation + 1}")
        finally:
            os.close(fd)  # the manager holds its own copy now
        self._notifier.fdstore_remove(f"s.{self._generation}")
        self._generation += 1


def _describe(b: Buffer) -> dict[str, Any]:
    return {
        "id": b.id,
        "name": b.name,
        "size": b.size,
        "heap": b.heap,
        "owner": b.owner,
        "exporter": list(b.exporter),
        "created": b.created,
        "layout": None if b.layout is None else [b.layout.size, b.layout.length],
    }


@dataclass
class _Found:
    memfd: int | None = None
    handles: list[tuple[int, int, int, bool, int, int, int]] = field(default_factory=list)


def restore(stored: list[tuple[int, str]], state: State, handles: HandleTable, notifier: Notifier) -> int:
    """Rebuild buffers from fds the manager handed back; returns the snapshot generation.

    Takes ownership of every fd in ``stored``: each is adopted, or closed and removed from
    the store.
    """
    found: dict[int, _Found] = {}
    snapshots: dict[int, int] = {}
    timelines: list[tuple[int, str]] = []
    for fd, name in stored:
        if is_timeline_stored(name):
            timelines.append((fd, name))
        elif m := _HANDLE.fullmatch(name):
            buffer_id, owner, size, mode, uid, ino, key = m.groups()
            entry = found.setdefault(int(buffer_id), _Found())
            entry.handles.append((fd, int(key), int(ino), mode == "r", int(uid), int(owner), int(size)))
        elif m := _MEMFD.fullmatch(name):
            found.setdefault(int(m[1]), _Found()).memfd = fd
        elif m := _SNAPSHOT.fullmatch(name):
            snapshots[int(m[1])] = fd
        else:
            log.warning("dropping an unknown stored descriptor %r", name)
            os.close(fd)
            notifier.fdstore_remove(name)
    generation = max(snapshots, default=0)
    snapshot = _read_snapshot(snapshots.get(generation))
    described = {b["id"]: b for b in snapshot.get("buffers", [])}
    for gen, fd in snapshots.items():
        os.close(fd)
        if gen != generation:
            notifier.fdstore_remove(f"s.{gen}")
    for buffer_id, entry in sorted(found.items()):
        if not entry.handles:  # held only by devices, which died with the old broker
            if entry.memfd is not None:
                os.close(entry.memfd)
                notifier.fdstore_remove(f"m.{buffer_id}")
            continue
        *_, owner, size = entry.handles[0]
        info = described.get(buffer_id, {})
        layout = _layout(info.get("layout"))
        buffer = state.restore(
            id=buffer_id,
            size=size,
            owner=owner,
            heap=info.get("heap", "memfd"),
            name=info.get("name"),
            exporter=tuple(info.get("exporter", (0, "?", 0))),
            created=info.get("created", state.clock()),
            backing=None if entry.memfd is None else Backing(entry.memfd, size),
            layout=layout,
        )
        for fd, key, ino, readonly, uid, _, _ in entry.handles:
            handles.adopt(fd, key, ino, uid)
            state.add_handle(buffer, key, readonly=readonly, uid=uid)
    if found:
        log.info("restored %d buffers from the file descriptor store", len(state.buffers))
    restore_timelines(
        timelines, {t["id"]: t for t in snapshot.get("timelines", [])}, state, handles, notifier
    )
    return generation


def _layout(raw: Any) -> Layout | None:
    """A stored layout: ``[size, segment length]`` (or the segments themselves, as once stored)."""
    if not raw:
        return None
    if len(raw) == 2 and all(type(x) is int for x in raw):
        return Layout(raw[0], raw[1])
    return Layout.from_segments([Segment.from_wire(segment) for segment in raw])


def _read_snapshot(fd: int | None) -> dict[str, Any]:
    if fd is None:
        return {}
    with contextlib.suppress(Exception):  # a damaged snapshot only costs names and layouts
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        snapshot = msgpack.unpackb(data)
        if all(type(b.get("id")) is int for b in [*snapshot["buffers"], *snapshot.get("timelines", [])]):
            return dict(snapshot)
    log.warning("the stored snapshot is unreadable; buffers come back without names")
    return {}
