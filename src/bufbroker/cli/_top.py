"""``bufbroker top``: the buffers table, redrawn in place until Ctrl-C (like pw-top)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ._format import iec, table
from ._views import BUFFER_COLUMNS, buffer_rows, owner_name

__all__ = ["SORT_KEYS", "top"]

SORT_KEYS = {"size": "size", "age": "age", "id": "id", "handles": "handles", "mapped": "mapped"}
_HOME_AND_CLEAR = "\x1b[H\x1b[2J"


def _frame(device: Any, sort: str, legend: bool) -> str:
    stats = device.stats()
    rows = buffer_rows(device.buffers())
    rows.sort(key=lambda r: r[SORT_KEYS[sort]], reverse=sort != "id")
    head = (
        f"bufbroker {stats['version']} pid {stats['pid']}: {stats['buffers']} buffers, "
        f"{iec(stats['bytes'])} ({iec(stats['backed_bytes'])} allocated), {stats['devices']} devices, "
        f"{stats['mappings']} mappings   sorted by {sort}"
    )
    body = table(BUFFER_COLUMNS, [_cells(r) for r in rows], legend=legend)
    return f"{head}\n\n{body}\n"


def _cells(r: dict[str, Any]) -> list[Any]:
    from ._format import age

    exporter = f"{r['exporter']['name']}/{r['exporter']['pid']}"
    return [
        r["id"],
        r["name"] or "-",
        iec(r["size"]),
        r["heap"],
        exporter,
        r["handles"],
        r["attached"],
        r["mapped"],
        owner_name(r["owner"]),
        age(r["age"]),
    ]


def top(device: Any, *, sort: str, interval: float, iterations: int | None, legend: bool) -> int:
    live = sys.stdout.isatty()
    shown = 0
    try:
        while iterations is None or shown < iterations:
            frame = _frame(device, sort, legend)
            sys.stdout.write((_HOME_AND_CLEAR if live else "") + frame)
            sys.stdout.flush()
            shown += 1
            if iterations is None or shown < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0
