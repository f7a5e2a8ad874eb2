"""``bufbroker``: ask the broker who holds what (``ls``, ``show``, ``devices``, ``bufinfo``, ...).

Start-up matters (a person types it, scripts call it in loops): it uses the blocking client,
never trio, and imports json, pwd and the renderers only when a command needs them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _options(parser: argparse.ArgumentParser, *, under_command: bool) -> None:
    """The global options, accepted before or after the command (without clobbering either)."""
    unset = argparse.SUPPRESS if under_command else None
    parser.add_argument("--socket", metavar="PATH", default=unset, help="the broker's socket")
    parser.add_argument("--json", action="store_true", default=unset or False, help="JSON, not a table")
    parser.add_argument("--no-legend", action="store_true", default=unset or False, help="no header line")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bufbroker", description="Inspect a running bufbroker broker.")
    _options(parser, under_command=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _options(sub, under_command=True)
        return sub

    command("ls", "one row per buffer")
    command("show", "everything about one buffer").add_argument("id", type=int)
    command("devices", "one row per device (client connection)")
    command("bufinfo", "the kernel's debugfs dma_buf/bufinfo format")
    command("stats", "totals, limits and their use")
    top = command("top", "a live view of the buffers, until Ctrl-C")
    top.add_argument("--sort", choices=["size", "age", "id", "handles", "mapped"], default="size")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    top.add_argument("--iterations", type=int, default=None, metavar="N", help="stop after N refreshes")
    units = command("install-units", "write the systemd units for this installation")
    units.add_argument("--user", action="store_true", help="for the user's own manager")
    units.add_argument("--dest", type=Path, help="directory to write to")
    return parser


def _print_json(data: Any) -> None:
    import json

    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _ls(dev: Any, args: argparse.Namespace) -> int:
    from ._format import age, iec, table
    from ._views import BUFFER_COLUMNS, buffer_rows, owner_name

    rows = buffer_rows(dev.buffers())
    if args.json:
        _print_json(rows)
        return 0
    cells = [
        [
            r["id"],
            r["name"] or "-",
            iec(r["size"]),
            r["heap"],
            f"{r['exporter']['name']}/{r['exporter']['pid']}",
            r["handles"],
            r["attached"],
            r["mapped"],
            owner_name(r["owner"]),
            age(r["age"]),
        ]
        for r in rows
    ]
    print(table(BUFFER_COLUMNS, cells, legend=not args.no_legend))
    return 0


def _show(dev: Any, args: argparse.Namespace) -> int:
    import time

    from ._format import age, iec, table

    found = [b for b in dev.buffers() if b["id"] == args.id]
    if not found:
        print(f"bufbroker: no buffer {args.id} (or it belongs to another user)", file=sys.stderr)
        return 1
    b = found[0]
    if args.json:
        _print_json({**b, "age": max(0.0, time.time() - b["created"])})
        return 0
    exporter = b["exporter"]
    print(
        f"buffer {b['id']} {b['name'] or '(no name)'}: {iec(b['size'])} ({b['size']} bytes), heap {b['heap']}"
    )
    print(
        f"  exporter {exporter['name']} (device {exporter['device']}, pid {exporter['pid']}), owner uid "
        f"{b['owner']}, age {age(time.time() - b['created'])}, {b['handles']} live handles"
    )
    if b["layout"] is None:
        print("  layout: not allocated yet (at the first map or cpu access)")
    else:
        print(f"  layout: {len(b['layout'])} segments")
        print(table(("FD", "OFFSET", "LENGTH"), b["layout"], legend=not args.no_legend))
    sections: list[tuple[str, tuple[str, ...], list[list[Any]]]] = [
        (
            "held by",
            ("DEVICE", "NAME", "PID", "COUNT"),
            [[i["device"], i["name"], i["pid"], i["count"]] for i in b["importers"]],
        ),
        (
            "attachments",
            ("ID", "DEVICE", "NAME", "PID", "DIRECTION", "MAPS"),
            [
                [a["id"], a["device"], a["name"], a["pid"], a["direction"] or "-", a["map_count"]]
                for a in b["attachments"]
            ],
        ),
        (
            "cpu access",
            ("DEVICE", "NAME", "PID", "ACCESS", "COUNT"),
            [[c["device"], c["name"], c["pid"], c["access"], c["count"]] for c in b["cpu_access"]],
        ),
    ]
    for title, columns, rows in sections:
        print(f"  {title}: {'none' if not rows else ''}".rstrip())
        if rows:
            print(table(columns, rows, legend=not args.no_legend))
    return 0


def _devices(dev: Any, args: argparse.Namespace) -> int:
    from ._format import iec, table
    from ._views import DEVICE_COLUMNS, device_rows

    rows = device_rows(dev.devices(), dev.buffers())
    if args.json:
        _print_json(rows)
        return 0
    cells = [
        [
            r["pid"],
            r["uid"],
            r["name"],
            r["command"][:40],
            r["buffers"],
            iec(r["bytes"]),
            iec(r["pss"]),
            r["attachments"],
            r["mappings"],
        ]
        for r in rows
    ]
    print(table(DEVICE_COLUMNS, cells, legend=not args.no_legend))
    return 0


def _bufinfo(dev: Any, args: argparse.Namespace) -> int:
    from ._bufinfo import parse_bufinfo, render_bufinfo

    text = render_bufinfo(dev.buffers())
    if args.json:
        _print_json(parse_bufinfo(text))
    else:
        sys.stdout.write(text)
    return 0


def _stats(dev: Any, args: argparse.Namespace) -> int:
    from ._format import age, iec, table

    s = dev.stats()
    if args.json:
        _print_json(s)
        return 0
    limits, usage = s["limits"], s["usage"]
    print(f"bufbroker {s['version']}, pid {s['pid']}, up {age(s['uptime'])}")
    rows = [
        [
            "buffers",
            s["buffers"],
            f"{usage['buffers']} of {limits['max_buffers_per_uid']} for uid {usage['uid']}",
        ],
        [
            "bytes",
            iec(s["bytes"]),
            f"{iec(usage['bytes'])} of {iec(limits['max_bytes_per_uid'])} for uid "
            f"{usage['uid']}; {iec(s['bytes'])} of {iec(limits['max_memory'])} in all",
        ],
        ["allocated", iec(s["backed_bytes"]), "memory behind buffers that were mapped"],
        ["devices", s["devices"], ""],
        [
            "connections",
            s["connections"],
            f"{usage['connections']} of {limits['max_connections_per_uid']} for uid",
        ],
        ["handles", s["handles"], ""],
        ["attachments", s["attachments"], ""],
        ["mappings", s["mappings"], ""],
    ]
    print(table(("WHAT", "NOW", "LIMIT"), rows, legend=not args.no_legend))
    print("limits: " + ", ".join(f"{k}={v}" for k, v in limits.items()))
    return 0


def _top(dev: Any, args: argparse.Namespace) -> int:
    from ._top import top

    return top(
        dev, sort=args.sort, interval=args.interval, iterations=args.iterations, legend=not args.no_legend
    )


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "ls": _ls,
    "show": _show,
    "devices": _devices,
    "bufinfo": _bufinfo,
    "stats": _stats,
    "top": _top,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "install-units":
        from ._units import install_units

        try:
            print("\n".join(install_units(user=args.user, dest=args.dest)))
        except OSError as e:
            print(f"bufbroker: {e}", file=sys.stderr)
            return 1
        return 0

    from ..client import connect

    try:
        with connect("bufbroker-cli", socket=args.socket) as dev:
            return COMMANDS[args.command](dev, args)
    except OSError as e:  # BrokerUnavailable names the socket and how to start the broker
        print(f"bufbroker: {e.strerror or e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `bufbroker ls | head`
        return 0
