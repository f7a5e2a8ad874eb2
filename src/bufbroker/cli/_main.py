"""``bufbroker``: ask a running broker who holds what (``ls``, ``show``, ``devices``, ...).

Start-up time is part of the interface: a person types this, and scripts call it in loops. So
this module imports argparse and nothing heavy; it uses the blocking client (never trio, which
costs ~140 ms), and each command imports only what it needs (json, pwd, the renderers, the
unit installer) when it runs. docs/CLI.md records the measured figure.

Errors end at one boundary, ``main``: every failure is one line on stderr and exit status 1,
never a traceback; an unreachable broker's line names the socket and how to start a broker.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

TYPE_CHECKING = False  # typing costs start-up time at run time

if TYPE_CHECKING:
    from ..client import Device

__all__ = ["main"]

_PROG = "bufbroker"


class _Fail(Exception):
    """A failure already worded for the person at the terminal: printed as is, exit status 1."""


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
        default=default(10.0),
        help="give up on a broker that does not answer within this time [default: 10]",
    )


_COMMANDS = {
    "ls": "one row per buffer",
    "show": "everything about one buffer, by id or name",
    "devices": "one row per device (client connection)",
    "bufinfo": "the buffers in the kernel's debugfs dma_buf/bufinfo format",
    "stats": "totals, limits and their use, uptime",
    "top": "the buffers, redrawn in place until q or Ctrl-C",
    "install-units": "write the systemd units, pointed at this installation's bufbrokerd",
}
_VALUED = ("--socket", "--timeout")  # global options that take a value


def _chosen(argv: list[str]) -> str | None:
    """The command named in ``argv``, found without parsing it (see ``_parser``)."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _VALUED:
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def _parser(argv: list[str]) -> argparse.ArgumentParser:
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
    for name, help in _COMMANDS.items():
        if name != chosen:
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


def _describe(e: OSError) -> str:
    """One line for an OSError: BrokerError carries its whole message in ``strerror``."""
    from ._format import printable

    text = e.strerror or str(e)
    # Error messages may quote what a client named (a buffer name, a path).
    return printable(f"{e.filename}: {text}" if e.filename else text)


def _connect(socket: str | None, timeout: float = 10.0) -> Device:
    from ..client import connect
    from ..protocol import BrokerError

    try:
        # The socket the user named, or None: the error then explains the default rule.
        return connect("bufbroker-cli", socket=socket, timeout=timeout)
    except BrokerError as e:
        if e.errno != errno.EACCES:
            raise
        from .._paths import default_socket_path

        path = socket or default_socket_path()
        raise _Fail(
            f"cannot connect to {path}: permission denied; the system broker admits members of the "
            "bufbroker group (docs/SYSTEMD.md)"
        ) from None


def _inspect(args: argparse.Namespace, source: Device) -> str | None:
    """Run one inspection command: compute its data, render it; None when it printed itself."""
    from . import _commands as commands
    from . import _render as render

    legend = not args.no_legend
    match args.command:
        case "ls":
            rows = commands.list_buffers(source)
            return render.render_json(rows) if args.json else render.render_buffers(rows, legend=legend)
        case "show":
            try:
                data = commands.show_buffer(source, args.buffer)
            except commands.NoSuchBuffer as e:
                raise _Fail(str(e)) from None
            return render.render_json(data) if args.json else render.render_show(data, legend=legend)
        case "devices":
            devices = commands.list_devices(source, exclude=source.id)
            return render.render_json(devices) if args.json else render.render_devices(devices, legend=legend)
        case "bufinfo":
            from ._bufinfo import parse_bufinfo, render_bufinfo

            buffers = source.buffers()
            if args.json:
                return render.render_json(parse_bufinfo(render_bufinfo(buffers)))
            # The text already ends in a newline, as the kernel's file does.
            return render_bufinfo(buffers, escape=True).removesuffix("\n")
        case "stats":
            stats = source.stats()
            return render.render_json(stats) if args.json else render.render_stats(stats, legend=legend)
        case "top":
            from ._top import top

            top(source, sort=args.sort, interval=args.interval, iterations=args.iterations, legend=legend)
            return None
    raise AssertionError(f"unhandled command {args.command}")


def _install_units(args: argparse.Namespace) -> str:
    from pathlib import Path

    from ._units import install_units, next_steps

    try:
        written = install_units(user=args.user, dest=None if args.dest is None else Path(args.dest))
    except PermissionError as e:
        hint = "" if args.user or args.dest else " (run it as root, or add --user)"
        raise _Fail(_describe(e) + hint) from None
    if args.json:
        from ._render import render_json

        return render_json([str(path) for path in written])
    return "\n".join(next_steps(written, user=args.user, managed=args.dest is None))


def _run(args: argparse.Namespace) -> None:
    if args.command == "install-units":
        text: str | None = _install_units(args)
    else:
        with _connect(args.socket, timeout=args.timeout) as source:
            text = _inspect(args, source)
    if text is not None:
        sys.stdout.write(text + "\n")
    # Flush here, inside main's error boundary: a reader that went away (`| head -1`) must
    # surface as BrokenPipeError now, not as a complaint from the interpreter at exit.
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """The ``bufbroker`` command; returns the exit status (docs/CLI.md lists them)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if args.command == "top" and args.json:  # a usage error, found before any connection
        parser.error("top has no --json; for scripts, `bufbroker ls --json` in a loop")
    try:
        _run(args)
    except BrokenPipeError:
        # The reader closed the pipe: nothing to say. Point stdout at /dev/null so that the
        # interpreter's last flush does not fail again, and exit as SIGPIPE would have (128+13).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 0 if args.command == "top" else 130  # Ctrl-C is how top ends; elsewhere, 128+SIGINT
    except _Fail as e:
        print(f"{_PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # BrokerUnavailable, BrokerError, or the system's own (EACCES, ...)
        print(f"{_PROG}: {_describe(e)}", file=sys.stderr)
        return 1
    return 0
