"""``bufbroker``: ask a running broker who holds what (``ls``, ``show``, ``devices``, ...).

Start-up time is part of the interface: a person types this, and scripts call it in loops. So
this module imports nothing heavy; it uses the blocking client (never trio, which costs
~140 ms), reads the command line without argparse where it can (``_args``), and each command
imports only what it needs (json, pwd, the renderers, the unit installer) when it runs.
docs/CLI.md records the measured figure.

Errors end at one boundary, ``main``: every failure is one line on stderr and exit status 1,
never a traceback; an unreachable broker's line names the socket and how to start a broker.
"""

from __future__ import annotations

import errno
import os
import sys

TYPE_CHECKING = False  # typing costs start-up time at run time

if TYPE_CHECKING:
    from argparse import Namespace

    from ..client import Device

__all__ = ["main"]

_PROG = "bufbroker"


class _Fail(Exception):
    """A failure already worded for the person at the terminal: printed as is, exit status 1."""


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


def _inspect(args: Namespace, source: Device) -> str | None:
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

            buffers = source.buffers()
            if args.json:
                return render.render_json(parse_bufinfo(render_bufinfo(buffers)))
            # The text already ends in a newline, as the kernel's file does.
            return render_bufinfo(buffers, escape=True).removesuffix("\n")
        case "stats":
            stats = source.stats()
            return render.render_json(stats) if args.json else render.render_stats(stats, legend=legend)
        case "heaps":
            from ._heaps import render_heaps

            heaps = source.heaps()
            return render.render_json(heaps) if args.json else render_heaps(heaps, legend=legend)
        case "top":
            from ._top import top

            top(source, sort=args.sort, interval=args.interval, iterations=args.iterations, legend=legend)
            return None
    raise AssertionError(f"unhandled command {args.command}")


def _install_units(args: Namespace) -> str:
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


def _run(args: Namespace) -> None:
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
    from ._args import parse

    args = parse(sys.argv[1:] if argv is None else argv)
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
