"""What the inspection ops return: the state as plain maps (the wire schema in PROTOCOL.md).

A non-root caller sees the buffers its uid owns or holds and its uid's devices; root sees all,
as /sys/kernel/debug/dma_buf/bufinfo is for root only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ._records import Buffer, Device
from ._state import State

__all__ = ["buffer_entries", "device_entries", "stats"]


def _visible_buffer(buffer: Buffer, viewer: int) -> bool:
    return viewer == 0 or buffer.owner == viewer or any(d.uid == viewer for d in buffer.holders.values())


def _buffer(state: State, buffer: Buffer) -> dict[str, Any]:
    device_id, name, pid = buffer.exporter
    devices = state.devices
    return {
        "id": buffer.id,
        "name": buffer.name,
        "size": buffer.size,
        "heap": buffer.heap,
        "exporter": {"device": device_id, "name": name, "pid": pid},
        "owner": buffer.owner,
        "created": buffer.created,
        "handles": len(buffer.handles),
        "layout": None if buffer.layout is None else [s.to_wire() for s in buffer.layout],
        "importers": [
            {"device": d.id, "name": d.name, "pid": d.pid, "count": d.refs[buffer.id].count}
            for d in buffer.holders.values()
        ],
        "attachments": [
            {
                "id": a.id,
                "device": a.device.id,
                "name": a.device.name,
                "pid": a.device.pid,
                "direction": a.direction.value if a.direction else None,
                "map_count": a.map_count,
            }
            for a in buffer.attachments.values()
        ],
        "cpu_access": [
            {
                "device": dev_id,
                "name": devices[dev_id].name,
                "pid": devices[dev_id].pid,
                "access": access.value,
                "count": count,
            }
            for (dev_id, access), count in buffer.cpu.items()
        ],
    }


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
        "bytes": sum(ref.buffer.size for ref in device.refs.values()),
        "attachments": len(device.attachments),
        "mappings": sum(a.map_count for a in device.attachments.values()),
    }


def _page(ids: Iterator[tuple[int, Any]], after: int, limit: int) -> Iterator[Any]:
    for n, value in enumerate(v for k, v in ids if k > after):
        if n == limit:
            return
        yield value


def buffer_entries(state: State, viewer: int, after: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` visible buffers with ids above ``after``, in id order."""
    visible = ((i, b) for i, b in state.buffers.items() if _visible_buffer(b, viewer))
    return [_buffer(state, b) for b in _page(visible, after, limit)]


def device_entries(state: State, viewer: int, after: int, limit: int) -> list[dict[str, Any]]:
    visible = ((i, d) for i, d in state.devices.items() if viewer in (0, d.uid))
    return [_device(d) for d in _page(visible, after, limit)]


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
        "bytes": sum(b.size for b in buffers),
        "backed_bytes": sum(b.size for b in buffers if b.backing is not None),
        "devices": len(devices),
        "connections": connections,
        "handles": sum(len(b.handles) for b in buffers),
        "attachments": sum(len(d.attachments) for d in devices),
        "mappings": sum(a.map_count for d in devices for a in d.attachments.values()),
        "limits": state.config.as_dict(),
        "usage": {
            "uid": viewer,
            "connections": usage.connections,
            "buffers": usage.buffers,
            "bytes": usage.bytes,
        },
    }
