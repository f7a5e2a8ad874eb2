"""The command line, read: argparse's parser, and a quicker reading of the common case.

Most of ``bufbroker ls``'s start-up time above a bare interpreter was argparse's: importing it
(with gettext and locale), then a formatter and gettext look-ups for every option. A command
line made only of an inspection command and the global options (``bufbroker ls``,
``bufbroker show frame-0 --json``) is read here directly into the same namespace argparse would
give; anything else (help, ``--version``, ``top``, ``install-units``, any mistake) goes to
argparse, which alone says what is wrong.
"""

from __future__ import annotations

from types import SimpleNamespace

TYPE_CHECKING = False  # typing costs start-up time at run time
if TYPE_CHECKING:
    import argparse

__all__ = ["COMMANDS", "DEFAULT_TIMEOUT", "VALUED", "parse"]

DEFAULT_TIMEOUT = 10.0
COMMANDS = {
    "ls": "one row per buffer",
    "show": "everything about one buffer, by id or name",
    "devices": "one row per device (client connection)",
    "timelines": "one row per timeline: its signaller, value, promises, error and holders",
    "streams": "one row per stream, and under it each subscriber's position and lag",
    "bufinfo": "the buffers in the kernel's debugfs dma_buf/bufinfo format",
    "stats": "totals, limits and their use, uptime",
    "heaps": "each heap: page size, whether it can allocate here, what is allocated from it",
    "top": "the buffers, redrawn in place until q or Ctrl-C",
    "install-units": "write the systemd units, pointed at this installation's bufbrokerd",
}
VALUED = ("--socket", "--timeout")  # global options that take a value
_FLAGS = {"--json": "json", "--no-legend": "no_legend"}
_QUICK = {  # command: how many positionals it takes
    **{"ls": 0, "devices": 0, "timelines": 0, "streams": 0, "bufinfo": 0, "stats": 0, "heaps": 0},
    "show": 1,
}


def parse(argv: list[str]) -> argparse.Namespace:
    """What ``argv`` asks for; a usage error exits with status 2, as argparse does."""
    quick = _quick(argv)
    if quick is not None:
        return quick  # type: ignore[return-value]  # the same attributes
    from ._parser import parser

    p = parser(argv)
    args = p.parse_args(argv)
    if args.command == "top" and args.json:  # a usage error, found before any connection
        p.error("top has no --json; for scripts, `bufbroker ls --json` in a loop")
    return args


def _quick(argv: list[str]) -> SimpleNamespace | None:
    """The namespace for a plain inspection command line, or None to let argparse read it."""
    found = SimpleNamespace(socket=None, json=False, no_legend=False, timeout=DEFAULT_TIMEOUT, command=None)
    positionals: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        name, _, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in _FLAGS and not value:
            setattr(found, _FLAGS[name], True)
        elif name in VALUED:
            value = value or next(tokens, "")
            if name == "--socket":
                found.socket = value or None
            else:
                try:
                    found.timeout = float(value)
                except ValueError:
                    return None
                if not 0 < found.timeout < float("inf"):
                    return None
            if not value:
                return None
        elif token.startswith("-"):
            return None
        elif found.command is None:
            found.command = token
        else:
            positionals.append(token)
    if found.command not in _QUICK or len(positionals) != _QUICK[found.command]:
        return None
    if found.command == "show":
        found.buffer = positionals[0]
    return found
