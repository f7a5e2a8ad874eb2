"""What the inspection ops return: the state as plain maps (the wire schema in PROTOCOL.md).

A non-root caller sees the buffers its uid owns or holds and its uid's devices; root sees all,
as /sys/kernel/debug/dma_buf/bufinfo is for root only. Of a buffer it did not make, a non-root
caller sees nothing of other uids: no name, and no device, pid or command name of another
uid among its exporter, importers, attachments and cpu accesses (such entries are left out).

Listings come in pages that fit one packet whatever the state: at most PAGE entries and
REPLY_BYTES of them, so that with the reply's envelope they stay within MAX_REPLY_BYTES. An
entry too big for a page on its own (a buffer attached by thousands of devices, or laid out
in thousands of segments) has its longest lists cut short and says so with ``"truncated": true``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import protocol as p
from ..protocol import timeline as tl
from ._records import Buffer, Device, Timeline
from ._state import State
from ._streams import Stream

__all__ = [
    "PAGE",
    "REPLY_BYTES",
    "buffer_page",
    "device_page",
    "heap_list",
    "stats",
    "stream_page",
    "timeline_page",
]

REPLY_BYTES = p.MAX_REPLY_BYTES - 1024  # of entries in one page; the rest is the reply's envelope
PAGE = 128  # entries per page at most
MOST_LISTED = 2048  # items of one list in one entry at most (more cannot fit a reply anyway)


def _visible_buffer(buffer: Buffer, viewer: int) -> bool:
    return viewer == 0 or buffer.owner == viewer or any(d.uid == viewer for d in buffer.holders.values())


def _buffer(state: State, buffer: Buffer, viewer: int) -> dict[str, Any]:
    device_id, name, pid = buffer.exporter
    devices = state.devices
    theirs = viewer != 0 and buffer.owner != viewer  # another uid's buffer, seen by a holder

    def seen(device: Device) -> bool:
        return not theirs or device.uid == viewer

    return {
        "id": buffer.id,
        "name": None if theirs else buffer.name,
        "size": buffer.size,
        "span": buffer.span,
        "heap": buffer.heap,
        "sealable": buffer.sealable,
        "sealed": buffer.sealed,
        "immutable": buffer.immutable,
        "exporter": {
            **(
                {"device": None, "name": None, "pid": None}
                if theirs
                else {"device": device_id, "name": name, "pid": pid}
            ),
            "supplies": buffer.remote is not None,
        },
        "revoked": buffer.revoked,
        "pending_calls": _first(_pending(buffer, seen)),
        "owner": buffer.owner,
        "created": buffer.created,
        "handles": len(buffer.handles),
        "layout": None if buffer.layout is None else buffer.layout.to_wire(),
        "importers": _first(
            {"device": d.id, "name": d.name, "pid": d.pid, "count": d.refs[buffer.id].count}
            for d in buffer.holders.values()
            if seen(d)
        ),
        "attachments": _first(
            {
                "id": a.id,
                "device": a.device.id,
                "name": a.device.name,
                "pid": a.device.pid,
                "direction": a.direction.value if a.direction else None,
                "map_count": a.map_count,
                "dynamic": a.dynamic,
                "stale": a.stale,
            }
            for a in buffer.attachments.values()
            if seen(a.device)
        ),
        "cpu_access": _first(
            {
                "device": dev_id,
                "name": devices[dev_id].name,
                "pid": devices[dev_id].pid,
                "access": access.value,
                "count": count,
            }
            for (dev_id, access), count in buffer.cpu.items()
            if seen(devices[dev_id])
        ),
        "fences": [
            {
                "timeline": r.timeline.id,
                "name": r.timeline.name if viewer in (0, r.timeline.owner) else None,
                "point": r.point,
                "usage": "write" if r.write else "read",
                "status": r.timeline.page.status(r.point),
                "signalled_at": r.timeline.page.signalled_at,
            }
            for r in buffer.reservation
        ],
    }


def _timeline(state: State, timeline: Timeline, viewer: int) -> dict[str, Any]:
    """A timeline as listed; of another uid's timeline, a holder sees no names or pids."""
    device_id, name, pid = timeline.signaller
    theirs = viewer != 0 and timeline.owner != viewer
    slots = timeline.page.slots
    devices = state.devices
    return {
        "id": timeline.id,
        "name": None if theirs else timeline.name,
        "owner": timeline.owner,
        "created": timeline.created,
        "signaller": {
            "device": None if theirs else device_id,
            "name": None if theirs else name,
            "pid": None if theirs else pid,
            "alive": timeline.live is not None,
        },
        "value": tl.value(slots),
        "promised": tl.promised(slots),
        "error": tl.error(slots),
        "error_point": tl.error_point(slots) if tl.error(slots) else None,
        "signalled_at": tl.signalled_at(slots),
        "handles": len(timeline.handles),
        "holders": _first(
            {"device": d, "name": devices[d].name, "pid": devices[d].pid, "count": ref.count}
            for d, ref in timeline.holders.items()
            if not theirs or devices[d].uid == viewer
        ),
        "references": timeline.refs,
        "waits": len(timeline.waits),
    }


def _first(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MOST_LISTED of ``items``, plus one to tell that there were more (``_fill`` cuts it).

    A buffer may have hundreds of thousands of attachments; a listing builds no more of them
    than a page could hold.
    """
    return list(itertools.islice(items, MOST_LISTED + 1))


def _device(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "name": device.name,
        "pid": device.pid,
        "uid": device.uid,
        "gid": device.gid,
        "command": device.command,
        "connected": device.connected,
        "constraints": device.constraints.to_wire(),
        "buffers": list(device.refs),
        "bytes": sum(ref.buffer.span for ref in device.refs.values()),
        "attachments": len(device.attachments),
        "mappings": sum(a.map_count for a in device.attachments.values()),
        "exporter": device.exporter,
        "pending_calls": len(device.calls),
    }


def _pending(buffer: Buffer, seen: Callable[[Device], bool]) -> Iterator[dict[str, Any]]:
    """The calls its exporter has not answered yet (at most max_exporter_calls)."""
    if buffer.remote is None:
        return
    for c in buffer.remote.calls.values():
        if c.buffer is buffer and seen(c.importer):
            importer = c.importer
            yield {"id": c.id, "op": c.op, "device": importer.id, "pid": importer.pid, "started": c.started}


def buffer_page(state: State, viewer: int, after: int) -> tuple[list[dict[str, Any]], bool]:
    """The visible buffers with ids above ``after``, in id order: (one page, more to come)."""
    visible = (b for i, b in state.buffers.items() if i > after and _visible_buffer(b, viewer))
    return _fill(_buffer(state, b, viewer) for b in visible)


def device_page(state: State, viewer: int, after: int) -> tuple[list[dict[str, Any]], bool]:
    visible = (d for i, d in state.devices.items() if i > after and viewer in (0, d.uid))
    return _fill(_device(d) for d in visible)


def timeline_page(state: State, viewer: int, after: int) -> tuple[list[dict[str, Any]], bool]:
    """The visible timelines (owned by the viewer's uid, or held by one of its devices)."""
    devices = state.devices
    visible = (
        t
        for i, t in state.sync.timelines.items()
        if i > after and (viewer in (0, t.owner) or any(devices[d].uid == viewer for d in t.holders))
    )
    return _fill(_timeline(state, t, viewer) for t in visible)


def _stream(stream: Stream) -> dict[str, Any]:
    pub = stream.publisher
    sent = stream.sent
    return {
        "id": stream.id,
        "name": stream.name,
        "owner": stream.owner,
        "created": stream.created,
        "publisher": {"device": pub.id, "name": pub.name, "pid": pub.pid},
        "size": stream.size,
        "slots": stream.slots,
        "pool_bytes": stream.backing.size,
        "sent": sent,
        "in_use": stream.in_use,
        "subscribers": [
            {
                "id": s.id,
                "device": s.device.id,
                "name": s.device.name,
                "pid": s.device.pid,
                "start": s.start,
                "position": stream.position(s),
                "lag": sent - stream.position(s),
                "joined": s.joined,
            }
            for s in stream.subscribers.values()
        ],
    }


def stream_page(state: State, viewer: int, after: int) -> tuple[list[dict[str, Any]], bool]:
    """The visible streams (published by the viewer's uid; root: all), in id order."""
    streams = state.streams.streams
    visible = (s for i, s in streams.items() if i > after and viewer in (0, s.owner))
    return _fill(_stream(s) for s in visible)


def _fill(entries: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    page: list[dict[str, Any]] = []
    used = 0
    for entry in entries:
        if any(isinstance(v, list) and len(v) > MOST_LISTED for v in entry.values()):
            entry = {k: v[:MOST_LISTED] if isinstance(v, list) else v for k, v in entry.items()}
            entry["truncated"] = True
        size = p.packed_size(entry)
        if size > REPLY_BYTES:
            entry, size = _shrink(entry)
        if len(page) == PAGE or (page and used + size > REPLY_BYTES):
            return page, True
        page.append(entry)
        used += size
    return page, False


def _shrink(entry: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``entry`` with its longest lists halved until it fits a page, marked truncated.

    Everything else in an entry is bounded (names, a command line), so it always comes to fit.
    """
    entry = {**entry, "truncated": True}
    size = p.packed_size(entry)
    while size > REPLY_BYTES:
        lists = [k for k, v in entry.items() if isinstance(v, list) and v]
        if not lists:
            break
        longest = max(lists, key=lambda k: len(entry[k]))
        entry[longest] = entry[longest][: len(entry[longest]) // 2]
        size = p.packed_size(entry)
    return entry, size


def stats(state: State, viewer: int, version: str, connections: int) -> dict[str, Any]:
    buffers = [b for b in state.buffers.values() if _visible_buffer(b, viewer)]
    devices = [d for d in state.devices.values() if viewer in (0, d.uid)]
    usage = state.quotas.of(viewer)
    now = state.clock()
    return {
        "version": version,
        "pid": os.getpid(),
        "started": state.started,
        "uptime": now - state.started,
        "buffers": len(buffers),
        "bytes": sum(b.span for b in buffers),
        "backed_bytes": sum(b.span for b in buffers if b.backing is not None),
        "devices": len(devices),
        "connections": connections if viewer == 0 else usage.connections,
        "handles": sum(len(b.handles) for b in buffers),
        "attachments": sum(len(d.attachments) for d in devices),
        "mappings": sum(a.map_count for d in devices for a in d.attachments.values()),
        "timelines": usage.timelines if viewer else len(state.sync.timelines),
        "fences": usage.fences if viewer else len(state.sync.fences),
        "streams": usage.streams if viewer else len(state.streams.streams),
        "limits": state.config.as_dict(),
        "usage": {
            "uid": viewer,
            "connections": usage.connections,
            "buffers": usage.buffers,
            "bytes": usage.bytes,
            "handles": usage.handles,
            "waiting": usage.waiting,
            "timelines": usage.timelines,
            "fences": usage.fences,
            "streams": usage.streams,
            "subscriptions": usage.subscriptions,
        },
    }


def heap_list(state: State, viewer: int) -> list[dict[str, Any]]:
    """Each heap: its page size, whether it can allocate here, and what the viewer may see of
    what is allocated from it (root: everything)."""
    visible = [b for b in state.buffers.values() if _visible_buffer(b, viewer)]
    out = []
    for name, heap in state.heaps.items():
        mine = [b for b in visible if b.heap == name]
        reason = heap.unavailable()
        out.append(
            {
                "name": name,
                "page_size": heap.page_size,
                "available": reason is None,
                "reason": reason,
                "sealable": heap.sealable,
                "buffers": len(mine),
                "bytes": sum(b.span for b in mine),
                "backed_bytes": sum(b.span for b in mine if b.backing is not None),
                "pool": heap.pool(),
            }
        )
    return out
