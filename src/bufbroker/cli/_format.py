"""Rendering for people: IEC sizes, ages, aligned tables (bold headers only on a terminal)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["age", "iec", "table"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def iec(size: float) -> str:
    """``4096`` → ``4.0 KiB``; bytes below 1 KiB stay exact."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in _UNITS[1:]:
        size /= 1024
        if size < 1024 or unit == _UNITS[-1]:
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def age(seconds: float) -> str:
    """The largest whole unit, as ps and systemctl print ages: 5s, 3m, 2h, 4d."""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def _styled() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, legend: bool = True) -> str:
    """Aligned columns; numbers to the right. ``legend=False`` drops the header, for scripts."""
    cells = [[str(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and bool(rows) for i in range(len(columns))
    ]
    widths = [
        max([len(columns[i]) if legend else 0] + [len(r[i]) for r in cells]) for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    out = [line(r) for r in cells]
    if legend:
        header = line(columns)
        out.insert(0, f"\x1b[1m{header}\x1b[0m" if _styled() else header)
    return "\n".join(out)
