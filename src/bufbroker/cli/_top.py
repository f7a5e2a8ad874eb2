"""``bufbroker top``: the ``ls`` table and a summary line, redrawn in place until Ctrl-C.

Like pw-top and top: on a terminal it draws on the alternate screen, homing the cursor and
overwriting each line (then clearing what the previous frame left below) instead of clearing the
screen first, which would flicker; rows beyond the terminal's height are cut. When stdout is not
a terminal it prints frames one after another, as ``top -b`` does, so ``--iterations 1`` in a
pipe is a snapshot. Plain ANSI escapes: curses would cost start-up time and a terminfo lookup
for three sequences every terminal since the VT100 understands.
"""

from __future__ import annotations

import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable

from ._commands import list_buffers
from ._format import count, iec
from ._render import render_buffers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._commands import BufferRow, Source

__all__ = ["SORT_KEYS", "frame", "top"]

# Largest first for quantities, oldest first for age, creation order for id; ties by id.
_ORDER: dict[str, Callable[[BufferRow], tuple[float, int]]] = {
    "size": lambda r: (-r["size"], r["id"]),
    "age": lambda r: (-r["age"], r["id"]),
    "id": lambda r: (0, r["id"]),
    "handles": lambda r: (-r["handles"], r["id"]),
    "mapped": lambda r: (-r["mapped"], r["id"]),
}
SORT_KEYS = tuple(_ORDER)

_ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
_LEAVE = "\x1b[?25h\x1b[?1049l"
_HOME = "\x1b[H"
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


def frame(source: Source, *, sort: str, legend: bool = True) -> str:
    """One screenful: a summary of the broker, then its buffers in ``sort`` order."""
    stats = source.stats()
    rows = sorted(list_buffers(source), key=_ORDER[sort])
    head = (
        f"bufbroker {stats['version']} (pid {stats['pid']}): {count(stats['buffers'], 'buffer')}, "
        f"{iec(stats['bytes'])} ({iec(stats['backed_bytes'])} allocated), "
        f"{count(stats['devices'], 'device')}, {count(stats['attachments'], 'attachment')}, "
        f"{count(stats['mappings'], 'mapping')}; sorted by {sort}"
    )
    return f"{head}\n\n{render_buffers(rows, legend=legend)}\n"


def _draw(text: str) -> None:
    lines = text.splitlines()[: max(1, shutil.get_terminal_size().lines - 1)]
    sys.stdout.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in lines) + _CLEAR_BELOW)
    sys.stdout.flush()


def _wait(seconds: float, keys: int | None) -> bool:
    """Sleep ``seconds``, or less if ``q`` is typed on ``keys`` (a terminal); True if it was."""
    if keys is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([keys], [], [], left)[0] and os.read(keys, 32).lower().startswith(b"q"):
            return True
    return False


def top(source: Source, *, sort: str, interval: float, iterations: int | None, legend: bool = True) -> int:
    """Redraw every ``interval`` seconds, ``iterations`` times or until Ctrl-C; exit status 0.

    ``q`` typed on the terminal ends it as top's does (stdin is read key by key meanwhile,
    unechoed, and restored after). Ctrl-C is not an error either: it ends the loop quietly, wherever it lands
    (asleep, or mid-request; the caller then closes the connection, which the broker sees as an
    ordinary disconnect). The terminal is restored on every way out, errors included.
    """
    live = sys.stdout.isatty()  # NO_COLOR is about colour; moving the cursor is still wanted
    keys = sys.stdin.fileno() if live and sys.stdin.isatty() else None
    saved = termios.tcgetattr(keys) if keys is not None else None
    if live:
        sys.stdout.write(_ENTER)
    shown = 0
    try:
        if keys is not None:
            tty.setcbreak(keys)
        while iterations is None or shown < iterations:
            text = frame(source, sort=sort, legend=legend)
            if live:
                _draw(text)
            else:
                sys.stdout.write(("\n" if shown else "") + text)
                sys.stdout.flush()
            shown += 1
            if (iterations is None or shown < iterations) and _wait(interval, keys):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if keys is not None and saved is not None:
            termios.tcsetattr(keys, termios.TCSADRAIN, saved)
        if live:
            sys.stdout.write(_LEAVE)
            sys.stdout.flush()
    return 0
