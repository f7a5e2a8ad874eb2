"""Timelines that survive a broker restart, beside the buffers (see ``_fdstore``).

Stored, named so that the names alone say what each is::

    t.<id>.<owner>                      a timeline's page (its memfd)
    e.<id>                              its eventfd
    th.<id>.<uid>.<ino>.<key>           the broker's end of a timeline handle minted for <uid>

The snapshot adds each timeline's name, signaller and creation time. Signals and waits go on
while the broker is down (they never needed it); after the restart the handles clients kept
import again. The signaller's device ended with the old broker, so the broker no longer knows
its process by a connection: a timeline whose signaller's pid is gone is failed with ESRCH,
and a promised point gets a new max_fence_time from the restart.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import Any

from ._handles import HandleTable
from ._records import Key, Timeline
from ._state import State
from ._sync import SyncObserver
from ._timeline_page import TimelinePage

__all__ = ["TimelineStore", "describe_timeline", "is_timeline_stored", "restore_timelines"]

log = logging.getLogger("bufbroker.broker")

_PAGE = re.compile(r"t\.(\d+)\.(\d+)")
_EVENT = re.compile(r"e\.(\d+)")
_HANDLE = re.compile(r"th\.(\d+)\.(\d+)\.(\d+)\.(\d+)")


def is_timeline_stored(name: str) -> bool:
    return any(pattern.fullmatch(name) for pattern in (_PAGE, _EVENT, _HANDLE))


class TimelineStore(SyncObserver):
    """Mirrors timelines and their handles into the fd store."""

    def __init__(self, notifier: Any, state: State, handles: HandleTable, changed: Any) -> None:
        self._notifier = notifier
        self._handles = handles
        self._changed = changed  # the snapshot must be written again
        self._names: dict[Key, str] = {
            key: self._name(timeline, key)
            for key, timeline in state.sync.handles.items()
            if handles.end_of(key) is not None
        }

    def _name(self, timeline: Timeline, key: Key) -> str:
        return f"th.{timeline.id}.{timeline.handles[key]}.{self._handles.ino_of(key)}.{key}"

    def timeline_added(self, timeline: Timeline) -> None:
        self._notifier.fdstore([timeline.page.fd], f"t.{timeline.id}.{timeline.owner}")
        self._notifier.fdstore([timeline.page.eventfd], f"e.{timeline.id}")
        self._changed()

    def timeline_removed(self, timeline: Timeline) -> None:
        self._notifier.fdstore_remove(f"t.{timeline.id}.{timeline.owner}")
        self._notifier.fdstore_remove(f"e.{timeline.id}")
        self._changed()

    def handle_added(self, timeline: Timeline, key: Key) -> None:
        fd = self._handles.end_of(key)
        if fd is not None:
            name = self._names[key] = self._name(timeline, key)
            self._notifier.fdstore([fd], name)

    def handle_removed(self, timeline: Timeline, key: Key) -> None:
        name = self._names.pop(key, None)
        if name is not None:
            self._notifier.fdstore_remove(name)


def describe_timeline(timeline: Timeline) -> dict[str, Any]:
    return {
        "id": timeline.id,
        "name": timeline.name,
        "signaller": list(timeline.signaller),
        "created": timeline.created,
    }


def restore_timelines(
    stored: list[tuple[int, str]],
    described: dict[int, dict[str, Any]],
    state: State,
    handles: HandleTable,
    notifier: Any,
) -> None:
    """Rebuild timelines from what the manager handed back; every fd is adopted or closed."""
    pages: dict[int, tuple[int, int]] = {}  # id -> (fd, owner)
    events: dict[int, int] = {}
    kept: dict[int, list[tuple[int, int, int, int]]] = {}  # id -> [(fd, key, ino, uid)]
    for fd, name in stored:
        if m := _PAGE.fullmatch(name):
            pages[int(m[1])] = (fd, int(m[2]))
        elif m := _EVENT.fullmatch(name):
            events[int(m[1])] = fd
        elif m := _HANDLE.fullmatch(name):
            kept.setdefault(int(m[1]), []).append((fd, int(m[4]), int(m[3]), int(m[2])))
    for id in sorted(set(pages) | set(events) | set(kept)):
        page_fd, owner = pages.get(id, (-1, 0))
        event_fd = events.get(id, -1)
        ends = kept.get(id, [])
        page = None
        if page_fd >= 0 and event_fd >= 0 and ends:
            try:
                page = TimelinePage.adopt(page_fd, event_fd)
            except (OSError, ValueError) as e:
                log.warning("dropping stored timeline %d: %s", id, e)
        if page is None:  # incomplete, or held by devices only, which ended with the old broker
            for fd, name in ((page_fd, f"t.{id}.{owner}"), (event_fd, f"e.{id}")):
                if fd >= 0:
                    os.close(fd)
                    notifier.fdstore_remove(name)
            for fd, key, ino, uid in ends:
                os.close(fd)
                notifier.fdstore_remove(f"th.{id}.{uid}.{ino}.{key}")
            continue
        info = described.get(id, {})
        signaller = tuple(info.get("signaller", (0, "?", 0)))
        timeline = Timeline(
            id=id,
            name=info.get("name"),
            owner=owner,
            signaller=(int(signaller[0]), str(signaller[1]), int(signaller[2])),
            created=info.get("created", state.clock()),
            page=page,
            live=None,
        )
        state.reserve_id("timeline", id)
        state.sync.restore(timeline)
        for fd, key, ino, uid in ends:
            handles.adopt(fd, key, ino, uid)
            state.sync.add_handle(timeline, key, uid)
        if not _running(timeline.signaller[2]):
            state.sync.fail(timeline, errno.ESRCH)
    if pages:
        log.info("restored %d timelines from the file descriptor store", len(state.sync.timelines))


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
