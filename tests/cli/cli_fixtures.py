"""A broker's answers written out by hand (the wire schema of docs/PROTOCOL.md, "Inspection").

The scene: a camera process (pid 100) that is two devices, ``camera`` and ``preview``, and an
encoder process (pid 200). ``frame-0`` (3 MiB) is exported by camera, held by all three devices
and mapped by camera and encoder; ``scratch`` (8 KiB) is camera's alone, unallocated; buffer 3 (no
name, 4 KiB) is the encoder's, with a cpu access in progress.
"""

from __future__ import annotations

import copy
from typing import Any

NOW = 1_700_000_000.0
MiB = 1 << 20


def _device(
    id: int, name: str, pid: int, buffers: list[int], attachments: int, mappings: int
) -> dict[str, Any]:
    return {
        "id": id,
        "name": name,
        "pid": pid,
        "uid": 0,
        "gid": 0,
        "command": f"python3 {name}.py --fps 30",
        "connected": NOW - 100,
        "constraints": {},
        "buffers": buffers,
        "bytes": 0,
        "attachments": attachments,
        "mappings": mappings,
    }


BUFFERS: list[dict[str, Any]] = [
    {
        "id": 1,
        "name": "frame-0",
        "size": 3 * MiB,
        "heap": "memfd",
        "exporter": {"device": 1, "name": "camera", "pid": 100},
        "owner": 0,
        "created": NOW - 125,
        "handles": 2,
        "layout": [[0, 0, 2 * MiB], [0, 2 * MiB, MiB]],
        "importers": [
            {"device": 1, "name": "camera", "pid": 100, "count": 1},
            {"device": 2, "name": "preview", "pid": 100, "count": 1},
            {"device": 3, "name": "encoder", "pid": 200, "count": 2},
        ],
        "attachments": [
            {
                "id": 1,
                "device": 1,
                "name": "camera",
                "pid": 100,
                "direction": "from_device",
                "map_count": 1,
                "dynamic": False,
                "stale": 0,
            },
            {
                "id": 2,
                "device": 3,
                "name": "encoder",
                "pid": 200,
                "direction": "to_device",
                "map_count": 2,
                "dynamic": False,
                "stale": 0,
            },
            {
                "id": 3,
                "device": 2,
                "name": "preview",
                "pid": 100,
                "direction": None,
                "map_count": 0,
                "dynamic": False,
                "stale": 0,
            },
        ],
        "cpu_access": [],
    },
    {
        "id": 2,
        "name": "scratch",
        "size": 8192,
        "heap": "memfd",
        "exporter": {"device": 1, "name": "camera", "pid": 100},
        "owner": 0,
        "created": NOW - 7200,
        "handles": 1,
        "layout": None,
        "importers": [{"device": 1, "name": "camera", "pid": 100, "count": 1}],
        "attachments": [],
        "cpu_access": [],
    },
    {
        "id": 3,
        "name": None,
        "size": 4096,
        "heap": "memfd",
        "exporter": {"device": 3, "name": "encoder", "pid": 200},
        "owner": 65534,
        "created": NOW - 5,
        "handles": 0,
        "layout": [[0, 0, 4096]],
        "importers": [{"device": 3, "name": "encoder", "pid": 200, "count": 1}],
        "attachments": [],
        "cpu_access": [{"device": 3, "name": "encoder", "pid": 200, "access": "rw", "count": 1}],
    },
]

DEVICES: list[dict[str, Any]] = [
    _device(1, "camera", 100, [1, 2], attachments=1, mappings=1),
    _device(2, "preview", 100, [1], attachments=1, mappings=0),
    _device(3, "encoder", 200, [1, 3], attachments=1, mappings=2),
    _device(4, "bufbroker-cli", 300, [], attachments=0, mappings=0),
]

STATS: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 42,
    "started": NOW - 3600,
    "uptime": 3600.0,
    "buffers": 3,
    "bytes": 3 * MiB + 8192 + 4096,
    "backed_bytes": 3 * MiB + 4096,
    "devices": 4,
    "connections": 4,
    "handles": 3,
    "attachments": 3,
    "mappings": 3,
    "limits": {
        "max_message_size": 65536,
        "max_fds_per_message": 16,
        "max_pending_requests": 128,
        "max_connections_per_uid": 256,
        "max_incomplete_connections": 64,
        "max_buffers_per_uid": 4096,
        "max_bytes_per_uid": 1 << 30,
        "max_buffer_size": 4 << 30,
        "max_memory": 2 << 30,
        "handshake_timeout": 30.0,
    },
    "usage": {"uid": 0, "connections": 4, "buffers": 2, "bytes": 3 * MiB + 8192},
}


class FakeSource:
    """Answers like a connected Device, from the data above (fresh copies, as the wire gives)."""

    id = 4  # this "command's" own device

    def __init__(self) -> None:
        self.calls = 0

    def buffers(self) -> list[dict[str, Any]]:
        self.calls += 1
        return copy.deepcopy(BUFFERS)

    def devices(self) -> list[dict[str, Any]]:
        return copy.deepcopy(DEVICES)

    def stats(self) -> dict[str, Any]:
        return copy.deepcopy(STATS)

    def __enter__(self) -> FakeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
