"""``bufbroker heaps``: each heap, its page size, whether it can allocate, what it holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._format import iec, table

__all__ = ["HEAP_COLUMNS", "render_heaps"]

HEAP_COLUMNS = ("HEAP", "PAGE", "AVAILABLE", "BUFFERS", "BYTES", "BACKED", "POOL")


def _pool(heap: dict[str, Any]) -> str:
    """What the heap draws from, in a few words; why it cannot allocate, where it cannot."""
    if not heap["available"]:
        return str(heap.get("reason") or "unavailable")  # the table escapes every cell
    pool = heap.get("pool") or {}
    if "pages" in pool:
        return f"{pool['pages']} pages reserved, {max(pool['free_pages'], 0)} free"
    if "free_bytes" in pool:
        return f"{pool['path']}: {iec(pool['free_bytes'])} free of {iec(pool['size_bytes'])}"
    return "-"


def render_heaps(heaps: Sequence[dict[str, Any]], *, legend: bool = True) -> str:
    rows = [
        [
            h["name"],
            iec(h["page_size"]),
            "yes" if h["available"] else "no",
            h["buffers"],
            iec(h["bytes"]),
            iec(h["backed_bytes"]),
            _pool(h),
        ]
        for h in heaps
    ]
    return table(HEAP_COLUMNS, rows, legend=legend, right={"PAGE", "BYTES", "BACKED"})
