"""What each listing shows, computed from the broker's answers: data first, rendering after.

The JSON keys are the lower-case column names (docs/CLI.md); sizes are bytes, ages seconds.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

__all__ = ["BUFFER_COLUMNS", "DEVICE_COLUMNS", "buffer_rows", "device_rows", "owner_name"]

BUFFER_COLUMNS = ("ID", "NAME", "SIZE", "HEAP", "EXPORTER", "HANDLES", "ATTACHED", "MAPPED", "OWNER", "AGE")
DEVICE_COLUMNS = ("PID", "UID", "NAME", "COMMAND", "BUFFERS", "BYTES", "PSS", "ATTACHMENTS", "MAPPINGS")


def owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def buffer_rows(buffers: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    return [
        {
            "id": b["id"],
            "name": b["name"],
            "size": b["size"],
            "heap": b["heap"],
            "exporter": {"name": b["exporter"]["name"], "pid": b["exporter"]["pid"]},
            "handles": b["handles"],
            "attached": len(b["attachments"]),
            "mapped": sum(a["map_count"] for a in b["attachments"]),
            "owner": b["owner"],
            "age": max(0.0, now - b["created"]),
        }
        for b in buffers
    ]


def device_rows(devices: list[dict[str, Any]], buffers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per device; BYTES counts each buffer once per process, PSS shares it out.

    A process may hold several devices (connections); a buffer its devices share is its
    memory once. PSS divides each buffer's size by the number of processes holding it.
    """
    size = {b["id"]: b["size"] for b in buffers}
    holders: dict[int, set[int]] = defaultdict(set)  # buffer id -> pids
    for d in devices:
        for buffer_id in d["buffers"]:
            holders[buffer_id].add(d["pid"])
    claimed: dict[int, set[int]] = defaultdict(set)  # pid -> buffers already counted
    rows = []
    for d in devices:
        mine = [i for i in d["buffers"] if i in size and i not in claimed[d["pid"]]]
        claimed[d["pid"]].update(mine)
        rows.append(
            {
                "pid": d["pid"],
                "uid": d["uid"],
                "name": d["name"],
                "command": d["command"],
                "buffers": len(d["buffers"]),
                "bytes": sum(size[i] for i in mine),
                "pss": sum(size[i] // len(holders[i]) for i in mine),
                "attachments": d["attachments"],
                "mappings": d["mappings"],
            }
        )
    return rows
