"""Text for people: IEC sizes, short ages, aligned tables.

Only what a terminal reader needs; scripts read ``--json`` instead, where sizes are integer
bytes and ages seconds. Styling is one bold header line, and only when stdout is a terminal and
``NO_COLOR`` (https://no-color.org) is unset, so piped output is always plain text.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence

__all__ = ["age", "count", "iec", "printable", "styled", "table"]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def iec(size: int) -> str:
    """``4096`` → ``4.0 KiB``, ``64 << 20`` → ``64.0 MiB``; under 1 KiB the exact ``N B``.

    One decimal, as ``ls -lh`` and ``free -h`` print; buffers are page multiples, so the B form
    only shows for the odd total.
    """
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        # Round first: 1023.96 KiB would print as "1024.0 KiB" rather than move up a unit.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def age(seconds: float) -> str:
    """The largest whole unit, as ps and systemctl print ages: ``5s``, ``3m``, ``2h``, ``4d``."""
    seconds = max(0.0, seconds)  # a clock stepped back must not print "-1s"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on escaped, as ``ls -q`` and systemctl do.

    Names, command lines and paths come from clients: an ESC could clear the screen or retitle
    the terminal, a newline could add a row that looks like the broker's. Control and other
    unprintable characters become ``\\xNN`` / ``\\uNNNN`` (and ``\\`` itself ``\\\\``, so the
    escaped text reads back unambiguously); everything else is left alone.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def count(n: int, noun: str) -> str:
    """``1 attachment``, ``2 attachments``: English plurals of the nouns the commands count."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def styled() -> bool:
    """Whether escape sequences may be written: a terminal, and the user did not opt out."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    legend: bool = True,
    right: Collection[str] = (),
) -> str:
    """Columns two spaces apart; numbers and the columns named in ``right`` flush right.

    ``legend=False`` drops the header line (``--no-legend``, as systemctl has), so that
    ``bufbroker ls --no-legend | while read id name ...`` sees data rows only. Cells are never
    truncated here: a renderer that wants a narrow column cuts it itself.
    """
    cells = [["-" if c is None else printable(str(c)) for c in row] for row in rows]
    flush_right = [
        name in right or (bool(rows) and all(isinstance(row[i], int | float) for row in rows))
        for i, name in enumerate(columns)
    ]
    widths = [
        max([len(name) if legend else 0, *(len(r[i]) for r in cells)]) for i, name in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(widths[i]) if flush_right[i] else v.ljust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(padded).rstrip()

    out = [line(r) for r in cells]
    if legend:
        header = line(columns)
        out.insert(0, f"\x1b[1m{header}\x1b[0m" if styled() else header)
    return "\n".join(out)
