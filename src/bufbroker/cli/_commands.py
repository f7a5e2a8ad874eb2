"""What each command shows, computed from the broker's answers: data here, text in ``_render``.

Every function takes a ``Source`` (a connected ``bufbroker.Device``, or a fixture in the tests)
and returns plain data: lists of dicts for listings, a dict for one thing. That data is exactly
what ``--json`` prints, and its keys are the lower-case names of the table's columns, so the
JSON schema (docs/CLI.md, stable) is written down once, in the TypedDicts below. Sizes are
integer bytes and ages seconds; turning them into ``64.0 MiB`` and ``3m`` is the renderer's job.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol, TypedDict

__all__ = [
    "BufferRow",
    "DeviceRow",
    "NoSuchBuffer",
    "Source",
    "TimelineRow",
    "buffer_row",
    "device_rows",
    "list_buffers",
    "list_devices",
    "list_timelines",
    "show_buffer",
]


class NoSuchBuffer(LookupError):
    """``show ID`` for an id the broker does not list (freed, or not visible to this uid)."""


# The shapes of the data, for type checkers only: typing costs start-up time at run time.
if TYPE_CHECKING:

    class Source(Protocol):
        """What the commands need from a connection: the broker's three inspection ops."""

        def buffers(self) -> list[dict[str, Any]]: ...

        def devices(self) -> list[dict[str, Any]]: ...

        def stats(self) -> dict[str, Any]: ...

        def timelines(self) -> list[dict[str, Any]]: ...

    class Signaller(TypedDict):
        device: int | None  # None for another uid's timeline
        name: str | None
        pid: int | None
        alive: bool

    class TimelineRow(TypedDict):
        """One ``timelines`` row: ID NAME SIGNALLER VALUE PROMISED ERROR HOLDERS HANDLES AGE."""

        id: int
        name: str | None
        signaller: Signaller
        value: int
        promised: int
        error: int  # errno, 0 for none
        error_point: int | None
        holders: list[dict[str, Any]]  # devices holding it: {device, name, pid, count}
        handles: int
        owner: int
        age: float

    class Exporter(TypedDict):
        device: int
        name: str
        pid: int
        supplies: bool  # a device that supplies the memory and answers the ops (an exporter process)
        revoked: bool  # that exporter went away or revoked the buffer

    class BufferRow(TypedDict):
        """One ``ls`` row: ID NAME SIZE HEAP EXPORTER HANDLES ATTACHED MAPPED OWNER AGE."""

        id: int
        name: str | None
        size: int
        heap: str
        exporter: Exporter
        handles: int
        attached: int  # attachments, mapped or not
        mapped: int  # the attachments' map counts, summed
        owner: int  # uid; the table prints the user name
        age: float

    class DeviceRow(TypedDict):
        """One ``devices`` row: ID PID UID NAME COMMAND BUFFERS BYTES PSS ATTACHMENTS MAPPINGS CALLS.

        ``id`` is the device id that ``show`` lists holders by.
        """

        id: int
        pid: int
        uid: int
        name: str
        command: str
        buffers: int
        bytes: int
        pss: int
        attachments: int
        mappings: int
        calls: int | None  # an exporter's calls not answered yet; None for a device exporting nothing


def buffer_row(entry: dict[str, Any], now: float) -> BufferRow:
    exporter = entry["exporter"]
    return {
        "id": entry["id"],
        "name": entry["name"],
        "size": entry["size"],
        "heap": entry["heap"],
        "exporter": {
            "device": exporter["device"],
            "name": exporter["name"],
            "pid": exporter["pid"],
            "supplies": exporter.get("supplies", False),
            "revoked": entry.get("revoked", False),
        },
        "handles": entry["handles"],
        "attached": len(entry["attachments"]),
        "mapped": sum(a["map_count"] for a in entry["attachments"]),
        "owner": entry["owner"],
        "age": max(0.0, now - entry["created"]),
    }


def list_buffers(source: Source, now: float | None = None) -> list[BufferRow]:
    """``ls``: one row per buffer, in id order."""
    now = time.time() if now is None else now
    return [buffer_row(b, now) for b in source.buffers()]


def show_buffer(source: Source, buffer: int | str, now: float | None = None) -> dict[str, Any]:
    """``show ID``: the ``ls`` row plus everything the broker knows about the buffer.

    Added to the row: ``created`` (Unix time), ``layout`` (None until the first map or cpu
    access allocates backing; else ``[{"fd", "offset", "length"}]``, fd being the index of the
    backing memfd), and the broker's ``importers``, ``attachments``, ``cpu_access`` and
    ``fences`` (the reservation: ``{"timeline", "name", "point", "usage", "status",
    "signalled_at"}``) lists.
    """
    now = time.time() if now is None else now
    entry = _find(source.buffers(), buffer)
    layout = entry["layout"]
    return {
        **buffer_row(entry, now),
        "created": entry["created"],
        "layout": None
        if layout is None
        else [{"fd": fd, "offset": offset, "length": length} for fd, offset, length in layout],
        "importers": entry["importers"],
        "attachments": [{"dynamic": False, "stale": 0, **a} for a in entry["attachments"]],
        "cpu_access": entry["cpu_access"],
        "fences": entry.get("fences", []),
        "pending_calls": [
            {**c, "waiting": max(0.0, now - c["started"])} for c in entry.get("pending_calls", [])
        ],
    }


def _find(buffers: list[dict[str, Any]], buffer: int | str) -> dict[str, Any]:
    """The buffer ``buffer`` names: an id (a number, as the command line gives it) or a name.

    A name that is all digits is still a name when no buffer has that id.
    """
    text = str(buffer)
    if text.isdigit():
        for entry in buffers:
            if entry["id"] == int(text):
                return entry
    for entry in buffers:
        if entry["name"] == text:
            return entry
    shown = text if text.isdigit() else f"named {text!r}"
    raise NoSuchBuffer(f"no buffer {shown} (freed, or not visible to this user)")


def device_rows(devices: list[dict[str, Any]], buffers: list[dict[str, Any]]) -> list[DeviceRow]:
    """One row per device, with BYTES counted per process and PSS shared out between processes.

    A process may be several devices (one per connection), and memory is a process's, not a
    connection's: a buffer two devices of one process hold is that process's memory once. So
    each buffer counts toward BYTES of the first of its process's devices listed, and summing
    BYTES over one pid's rows gives the process's buffer memory. PSS divides each buffer's size
    by the number of distinct processes holding it (floored to whole bytes), as smaps does for
    shared pages, so PSS summed over every row is the memory all devices hold together.
    A buffer missing from ``buffers`` (freed between the two requests, or not visible to this
    uid) counts in BUFFERS but adds no bytes.
    """
    size = {b["id"]: b["size"] for b in buffers}
    holders: dict[int, set[int]] = {}  # buffer id -> pids holding it
    for d in devices:
        for buffer_id in d["buffers"]:
            holders.setdefault(buffer_id, set()).add(d["pid"])
    counted: dict[int, set[int]] = {}  # pid -> buffers already counted for that process
    rows: list[DeviceRow] = []
    for d in devices:
        seen = counted.setdefault(d["pid"], set())
        mine = [i for i in dict.fromkeys(d["buffers"]) if i in size and i not in seen]
        seen.update(mine)
        rows.append(
            {
                "id": d["id"],
                "pid": d["pid"],
                "uid": d["uid"],
                "name": d["name"],
                "command": d["command"],
                "buffers": len(set(d["buffers"])),
                "bytes": sum(size[i] for i in mine),
                "pss": sum(size[i] // len(holders[i]) for i in mine),
                "attachments": d["attachments"],
                "mappings": d["mappings"],
                "calls": d.get("pending_calls", 0) if d.get("exporter") else None,
            }
        )
    return rows


def list_devices(source: Source, *, exclude: int | None = None) -> list[DeviceRow]:
    """``devices``: one row per device (client connection), in id order.

    ``exclude`` is a device id left out: the command's own connection, which exists only to
    ask and would otherwise appear in every listing (``stats`` still counts it).
    """
    devices = [d for d in source.devices() if d["id"] != exclude]
    return device_rows(devices, source.buffers())


def list_timelines(source: Source, now: float | None = None) -> list[TimelineRow]:
    """``timelines``: one row per timeline, in id order."""
    now = time.time() if now is None else now
    return [
        {
            "id": t["id"],
            "name": t["name"],
            "signaller": t["signaller"],
            "value": t["value"],
            "promised": t["promised"],
            "error": t["error"],
            "error_point": t["error_point"],
            "holders": t["holders"],
            "handles": t["handles"],
            "owner": t["owner"],
            "age": max(0.0, now - t["created"]),
        }
        for t in source.timelines()
    ]
