"""argparse's reading of the command line: help, usage errors, and the commands ``_args``
leaves to it. Imported only when needed (argparse costs start-up time)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ._args import COMMANDS, DEFAULT_TIMEOUT, VALUED

__all__ = ["parser"]

_PROG = "bufbroker"


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in its errors
    return parse


class _Formatter(argparse.HelpFormatter):
    """argparse's own, learning the terminal's width without importing shutil (start-up time:
    argparse builds a formatter for every ``add_argument``)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        try:
            width = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                width = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                width = 80
        super().__init__(prog, indent_increment, max_help_position, width - 2)


def _global_options(parser: argparse.ArgumentParser, *, on_command: bool) -> None:
    """The options every command takes, accepted before the command or after it.

    They are declared twice, on the main parser and on each command's parser. On the command's
    parser the default is SUPPRESS: an option not given there leaves the attribute alone, so a
    ``--json`` given before the command is not reset by the command's parser.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if on_command else value

    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help="the broker's socket (default: $BUFBROKER_SOCKET, else the system or user socket)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON (schema in docs/CLI.md) instead of a table",
    )
    parser.add_argument(
        "--no-legend", action="store_true", default=default(False), help="no header line, for scripts"
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help="give up on a broker that does not answer within this time [default: 10]",
    )


def _chosen(argv: list[str]) -> str | None:
    """The command named in ``argv``, found without parsing it (see ``_parser``)."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in VALUED:
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the command ``argv`` names gets its options.

    Start-up time is mostly argparse's: every option costs a formatter and gettext look-ups.
    The other commands are listed (for ``--help`` and the error for a wrong name) but left
    bare, since they will parse nothing.
    """
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG,
        formatter_class=_Formatter,
        description="Inspect a running bufbroker broker: its buffers, devices and limits.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, on_command=False)
    # An explicit prog spares argparse a HelpFormatter (and its import of shutil) at start-up.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog=_PROG)
    chosen = _chosen(argv)
    # Help lists every command; otherwise a known command is the only one there is to parse.
    listed = chosen in COMMANDS and "-h" not in argv and "--help" not in argv
    for name, help in COMMANDS.items():
        if name != chosen:
            if not listed:
                commands.add_parser(name, help=help, add_help=False)
            continue
        sub = commands.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        _global_options(sub, on_command=True)
        if name == "show":
            sub.add_argument("buffer", metavar="ID|NAME", help="a buffer id, or a buffer's name")
        elif name == "top":
            sub.add_argument(
                "--sort",
                choices=("size", "age", "id", "handles", "mapped"),
                default="size",
                help="[default: size]",
            )
            sub.add_argument(
                "--interval", type=_positive(float), default=1.0, metavar="SECONDS", help="[default: 1]"
            )
            sub.add_argument("--iterations", type=_positive(int), metavar="N", help="stop after N refreshes")
        elif name == "install-units":
            sub.add_argument("--user", action="store_true", help="units for the user's own manager")
            sub.add_argument("--dest", metavar="DIR", help="write here instead of the manager's directory")
    return parser
