"""Renderers: the data ``_commands`` computes, as text for people or as JSON for scripts.

Each human renderer takes the very data ``--json`` prints, so the two outputs cannot disagree:
a column is a key, upper-cased, and a cell is its value in human units.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._format import age, iec, printable, styled, table

TYPE_CHECKING = False  # typing costs start-up time at run time
if TYPE_CHECKING:
    from typing import Any

    from ._commands import BufferRow, DeviceRow, TimelineRow

__all__ = [
    "BUFFER_COLUMNS",
    "DEVICE_COLUMNS",
    "TIMELINE_COLUMNS",
    "buffer_cells",
    "fence_status",
    "render_buffers",
    "render_devices",
    "render_json",
    "render_show",
    "render_stats",
    "render_timelines",
    "user_name",
]

BUFFER_COLUMNS = ("ID", "NAME", "SIZE", "HEAP", "EXPORTER", "HANDLES", "ATTACHED", "MAPPED", "OWNER", "AGE")
TIMELINE_COLUMNS = ("ID", "NAME", "SIGNALLER", "VALUE", "PROMISED", "ERROR", "HOLDERS", "HANDLES", "AGE")
DEVICE_COLUMNS = (
    "ID",
    "PID",
    "UID",
    "NAME",
    "COMMAND",
    "BUFFERS",
    "BYTES",
    "PSS",
    "ATTACHMENTS",
    "MAPPINGS",
    "CALLS",
)
# Sizes and ages are text in the table but quantities all the same: flush right, like numbers.
_RIGHT = {"SIZE", "AGE", "BYTES", "PSS", "LENGTH", "OFFSET"}
_COMMAND_WIDTH = 40  # on a terminal only; piped output keeps the whole command line

_users: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The user name for ``uid``, or the number when the passwd database has none (containers)."""
    if uid not in _users:
        import pwd  # only the commands that print owners pay for it

        try:
            _users[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _users[uid] = str(uid)
    return _users[uid]


def render_json(data: object) -> str:
    import json

    return json.dumps(data, indent=2, ensure_ascii=False)


def buffer_cells(row: BufferRow) -> list[object]:
    exporter = row["exporter"]
    return [
        row["id"],
        row["name"],
        iec(row["size"]),
        row["heap"],
        ("-" if exporter["name"] is None else f"{exporter['name']}/{exporter['pid']}")  # "-": another uid's
        + (",revoked" if exporter["revoked"] else ""),
        row["handles"],
        row["attached"],
        row["mapped"],
        user_name(row["owner"]),
        age(row["age"]),
    ]


def render_buffers(rows: Sequence[BufferRow], *, legend: bool = True) -> str:
    return table(BUFFER_COLUMNS, [buffer_cells(r) for r in rows], legend=legend, right=_RIGHT)


def _command(text: str) -> str:
    if styled() and len(text) > _COMMAND_WIDTH:
        return text[: _COMMAND_WIDTH - 1] + "…"
    return text


def render_devices(rows: Sequence[DeviceRow], *, legend: bool = True) -> str:
    cells = [
        [
            r["id"],
            r["pid"],
            r["uid"],
            r["name"],
            _command(r["command"]),
            r["buffers"],
            iec(r["bytes"]),
            iec(r["pss"]),
            r["attachments"],
            r["mappings"],
            r["calls"],
        ]
        for r in rows
    ]
    return table(DEVICE_COLUMNS, cells, legend=legend, right=_RIGHT)


def _section(title: str, entries: Sequence[dict[str, Any]], keys: Sequence[str], legend: bool) -> list[str]:
    """A titled sub-table whose columns are ``keys`` upper-cased (the JSON keys once more)."""
    if not entries:
        return [f"{title}: none"]
    body = table(
        [k.upper() for k in keys], [[e[k] for k in keys] for e in entries], legend=legend, right=_RIGHT
    )
    return [f"{title}:", *("  " + line for line in body.splitlines())]


def render_show(data: dict[str, Any], *, legend: bool = True) -> str:
    """``show ID``: a few lines of facts, then layout, holders, attachments and cpu access."""
    exporter = data["exporter"]
    where = f"(device {exporter['device']}, pid {exporter['pid']})"
    lines = [
        f"buffer {data['id']}: {printable(data['name']) if data['name'] else '(no name)'}",
        f"size: {iec(data['size'])} ({data['size']} bytes), heap {data['heap']}",
        (
            "exporter: (another user's device)"
            if exporter["name"] is None
            else f"exporter: {printable(exporter['name'])} {where}"
        )
        + (", which supplies the memory and answers the ops" if exporter["supplies"] else ""),
        f"owner: {user_name(data['owner'])} (uid {data['owner']}), age {age(data['age'])}",
        f"handles: {data['handles']} live",
    ]
    if exporter["revoked"]:
        lines.append("revoked: no new attach, map or cpu access (ENODEV); mappings made before stay")
    if data["layout"] is None:
        lines.append("layout: not allocated yet (backing comes at the first map or cpu access)")
    else:
        count = len(data["layout"])
        title = f"layout ({count} segment{'s' if count != 1 else ''})"
        lines += _section(title, data["layout"], ("fd", "offset", "length"), legend)
    lines += _section("held by", data["importers"], ("device", "name", "pid", "count"), legend)
    attachments = [{**a, "dynamic": "yes" if a["dynamic"] else "no"} for a in data["attachments"]]
    lines += _section(
        "attachments",
        attachments,
        ("id", "device", "name", "pid", "direction", "map_count", "dynamic", "stale"),
        legend,
    )
    if exporter["supplies"]:
        calls = [{**c, "waiting": age(c["waiting"])} for c in data["pending_calls"]]
        lines += _section("calls to the exporter", calls, ("id", "op", "device", "pid", "waiting"), legend)
    lines += _section("cpu access", data["cpu_access"], ("device", "name", "pid", "access", "count"), legend)
    fences = [{**f, "status": fence_status(f["status"])} for f in data.get("fences", [])]
    lines += _section("fences", fences, ("timeline", "name", "point", "usage", "status"), legend)
    return "\n".join(lines)


def fence_status(status: int) -> str:
    """sync_file's status in words: pending, signalled, or the failure's errno name."""
    if status < 0:
        import errno

        return errno.errorcode.get(-status, str(-status))
    return "signalled" if status else "pending"


def render_timelines(rows: Sequence[TimelineRow], *, legend: bool = True) -> str:
    cells = []
    for r in rows:
        signaller = r["signaller"]
        who = "-" if signaller["name"] is None else f"{signaller['name']}/{signaller['pid']}"
        error = f"{fence_status(-r['error'])} from {r['error_point']}" if r["error"] else "-"
        cells.append(
            [
                r["id"],
                r["name"],
                who if signaller["alive"] else f"({who} gone)",
                r["value"],
                r["promised"],
                error,
                len(r["holders"]),
                r["handles"],
                age(r["age"]),
            ]
        )
    return table(TIMELINE_COLUMNS, cells, legend=legend, right=_RIGHT)


def render_stats(data: dict[str, Any], *, legend: bool = True) -> str:
    """Totals beside this uid's use and its limits, then every limit by its config key."""
    limits, usage = data["limits"], data["usage"]
    uid = usage["uid"]
    rows: list[list[object]] = [
        ["buffers", data["buffers"], usage["buffers"], f"{limits['max_buffers_per_uid']} per uid"],
        [
            "bytes",
            iec(data["bytes"]),
            iec(usage["bytes"]),
            f"{iec(limits['max_bytes_per_uid'])} per uid, {iec(limits['max_memory'])} in all",
        ],
        ["allocated", iec(data["backed_bytes"]), "", "(buffers with backing memory)"],
        [
            "connections",
            data["connections"],
            usage["connections"],
            f"{limits['max_connections_per_uid']} per uid",
        ],
        ["devices", data["devices"], "", ""],
        ["handles", data["handles"], "", ""],
        ["attachments", data["attachments"], "", ""],
        ["mappings", data["mappings"], "", ""],
    ]
    head = f"bufbroker {data['version']}, pid {data['pid']}, up {age(data['uptime'])}"
    body = table(("WHAT", "NOW", f"UID {uid}", "LIMIT"), rows, legend=legend, right={"NOW", f"UID {uid}"})
    shown = [
        f"{k}={iec(v) if k.endswith(('_size', '_bytes_per_uid', '_memory')) else v}"
        for k, v in limits.items()
    ]
    return f"{head}\n{body}\nlimits: {', '.join(shown)}"
