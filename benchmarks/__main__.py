"""``python -m benchmarks [--quick] [--json] [--only GROUP,...]``: handoff, roundtrip, throughput, scale,
fences, streams, flight, heaps."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import fences, flight, handoff, heaps, roundtrip, scale, streams, throughput
from ._harness import Row, Settings, machine, render

GROUPS: dict[str, Callable[[Settings], list[Row]]] = {
    "handoff": handoff.run,
    "roundtrip": roundtrip.run,
    "throughput": throughput.run,
    "scale": scale.run,
    "fences": fences.run,
    "streams": streams.run,
    "flight": flight.run,
    "heaps": heaps.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few iterations (a smoke run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups")
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick)
    rows: list[Row] = []
    for name in args.only.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += GROUPS[name](settings)
    if not args.json:
        print(f"Machine: {machine()}\n")
    print(render(rows, args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
