"""``bufbroker streams``: each stream, its publisher, and each subscriber's position and lag.

``list_streams`` computes the data (what ``--json`` prints, its keys the table's columns in
lower case); ``render_streams`` prints one row per stream, and under it one row per
subscriber, indented, whose LAG is the frames sent that it has not given back yet.
"""

from __future__ import annotations

import time

from ._format import age, iec, printable, table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Protocol, TypedDict

__all__ = ["STREAM_COLUMNS", "StreamRow", "list_streams", "render_streams"]

STREAM_COLUMNS = ("ID", "NAME", "PUBLISHER", "SIZE", "SLOTS", "SENT", "IN-USE", "SUBSCRIBERS", "AGE")

# The shapes of the data, for type checkers only: typing costs start-up time at run time.
if TYPE_CHECKING:

    class Streams(Protocol):
        def streams(self) -> list[dict[str, Any]]: ...

    class Member(TypedDict):
        id: int
        name: str
        pid: int
        start: int  # the first frame it received
        position: int  # the last frame it gave back
        lag: int  # frames sent that it has not given back

    class Publisher(TypedDict):
        device: int
        name: str
        pid: int

    class StreamRow(TypedDict):
        id: int
        name: str
        publisher: Publisher
        size: int
        slots: int
        sent: int
        in_use: int
        subscribers: list[Member]
        owner: int
        age: float


def list_streams(source: Streams, now: float | None = None) -> list[StreamRow]:
    """``streams``: one row per stream, in id order."""
    now = time.time() if now is None else now
    return [
        {
            "id": s["id"],
            "name": s["name"],
            "publisher": s["publisher"],
            "size": s["size"],
            "slots": s["slots"],
            "sent": s["sent"],
            "in_use": s["in_use"],
            "subscribers": [
                {k: m[k] for k in ("id", "name", "pid", "start", "position", "lag")}  # type: ignore[misc]
                for m in s["subscribers"]
            ],
            "owner": s["owner"],
            "age": max(0.0, now - s["created"]),
        }
        for s in source.streams()
    ]


def render_streams(rows: Sequence[StreamRow], *, legend: bool = True) -> str:
    cells: list[list[object]] = []
    for r in rows:
        pub = r["publisher"]
        cells.append(
            [
                r["id"],
                printable(r["name"]),
                f"{printable(pub['name'])}/{pub['pid']}",
                iec(r["size"]),
                r["slots"],
                r["sent"],
                r["in_use"],
                len(r["subscribers"]),
                age(r["age"]),
            ]
        )
        for m in r["subscribers"]:
            where = f"at {m['position']}, lag {m['lag']}"
            cells.append(["", f"  {printable(m['name'])}/{m['pid']}", where, "", "", "", "", "", ""])
    return table(STREAM_COLUMNS, cells, legend=legend, right={"SIZE", "AGE"})
