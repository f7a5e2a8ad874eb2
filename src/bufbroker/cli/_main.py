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
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Inspect a running bufbroker broker: its buffers, devices and limits.",
    )
    _global_options(parser, on_command=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _global_options(sub, on_command=True)
        return sub

    command("ls", "one row per buffer")
    command("show", "everything about one buffer").add_argument("id", type=int, metavar="ID")
    command("devices", "one row per device (client connection)")
    command("timelines", "one row per timeline: its signaller, value, promises, error and holders")
    command("streams", "one row per stream, and under it each subscriber's position and lag")
    command("bufinfo", "the buffers in the kernel's debugfs dma_buf/bufinfo format")
    command("stats", "totals, limits and their use, uptime")
    top = command("top", "the buffers, redrawn in place until Ctrl-C")
    top.add_argument(
        "--sort", choices=("size", "age", "id", "handles", "mapped"), default="size", help="[default: size]"
    )
    top.add_argument("--interval", type=_positive(float), default=1.0, metavar="SECONDS", help="[default: 1]")
    top.add_argument("--iterations", type=_positive(int), metavar="N", help="stop after N refreshes")
    units = command("install-units", "write the systemd units, pointed at this installation's bufbrokerd")
    units.add_argument("--user", action="store_true", help="units for the user's own manager")
    units.add_argument("--dest", metavar="DIR", help="write here instead of the manager's directory")
    return parser


def _describe(e: OSError) -> str:
    """One line for an OSError: BrokerError carries its whole message in ``strerror``."""
    text = e.strerror or str(e)
    return f"{e.filename}: {text}" if e.filename else text


def _connect(socket: str | None) -> Device:
    from .._paths import default_socket_path
    from ..client import connect

    path = socket or default_socket_path()
    try:
        return connect("bufbroker-cli", socket=path)
    except PermissionError as e:  # the socket exists; its mode or group keeps us out
        raise _Fail(
            f"cannot connect to {path}: {e.strerror}; the system broker admits members of the "
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
                data = commands.show_buffer(source, args.id)
            except commands.NoSuchBuffer as e:
                raise _Fail(str(e)) from None
            return render.render_json(data) if args.json else render.render_show(data, legend=legend)
        case "devices":
            devices = commands.list_devices(source, exclude=source.id)
            return render.render_json(devices) if args.json else render.render_devices(devices, legend=legend)
        case "timelines":
            timelines = commands.list_timelines(source)
            return (
                render.render_json(timelines)
                if args.json
                else render.render_timelines(timelines, legend=legend)
            )
        case "streams":
            from ._streams import list_streams, render_streams

            streams = list_streams(source)
            return render.render_json(streams) if args.json else render_streams(streams, legend=legend)
        case "bufinfo":
            from ._bufinfo import parse_bufinfo, render_bufinfo

            text = render_bufinfo(source.buffers())
            # The text already ends in a newline, as the kernel's file does.
            return render.render_json(parse_bufinfo(text)) if args.json else text.removesuffix("\n")
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
    return "\n".join(next_steps(written, user=args.user))


def _run(args: argparse.Namespace) -> None:
    if args.command == "install-units":
        text: str | None = _install_units(args)
    else:
        with _connect(args.socket) as source:
            text = _inspect(args, source)
    if text is not None:
        sys.stdout.write(text + "\n")
    # Flush here, inside main's error boundary: a reader that went away (`| head -1`) must
    # surface as BrokenPipeError now, not as a complaint from the interpreter at exit.
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """The ``bufbroker`` command; returns the exit status (docs/CLI.md lists them)."""
    parser = _parser()
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
