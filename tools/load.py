"""Load: many client processes doing mixed operations at once, with no error and flat broker
memory.

    python -m tools.load --clients 256 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bufbroker
from bufbroker import Access, Direction

from ._common import Target, own_broker


@dataclass
class Report:
    clients: int = 0
    seconds: float = 0.0
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    broker_fds: tuple[int, int] = (0, 0)
    broker_rss_kib: tuple[int, int, int] = (0, 0, 0)  # before, at the peak of the load, after


def client(path: str, seconds: str, start: str, seed: str) -> None:
    """Mixed real work from ``start`` for ``seconds``; prints its op count or its error."""
    rng = random.Random(int(seed))
    try:
        with bufbroker.connect(f"load-{os.getpid()}", socket=path) as dev:
            while time.time() < float(start):
                time.sleep(0.005)
            end = float(start) + float(seconds)
            ops = 0
            while time.time() < end:
                buf = dev.allocate(rng.choice([4096, 65536, 1 << 20]))
                with buf.cpu_access(Access.WRITE) as mem:
                    mem[:4] = b"load"
                with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
                    if bytes(m.memory[:4]) != b"load":
                        raise AssertionError("read back the wrong bytes")
                fd = buf.share(readonly=True)
                again = dev.import_handle(fd)
                os.close(fd)
                again.close()
                dev.buffers() if rng.random() < 0.05 else dev.ping()
                buf.close()
                ops += 8
        print(ops, flush=True)
    except Exception as e:
        print(f"error {e!r}", flush=True)


def run(target: Target, *, clients: int, seconds: float) -> Report:
    report = Report(clients=clients, seconds=seconds)
    fds0, rss0 = target.fds(), target.rss_kib()
    start = time.time() + 1.0 + clients * 0.06  # all connected before the clock starts
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tools.load", "--client", target.socket, str(seconds), str(start), str(i)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for i in range(clients)
    ]
    peak = rss0
    try:
        while any(p.poll() is None for p in procs):
            peak = max(peak, target.rss_kib())
            time.sleep(0.2)
    finally:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 120)
            line = out.strip()
            if line.isdigit():
                report.ops += int(line)
            else:
                report.errors.append(line or f"exit {proc.returncode}")
    report.broker_fds = (fds0, target.settle(fds0))
    report.broker_rss_kib = (rss0, peak, target.rss_kib())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.load")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(*args.client)
        return
    with own_broker("--max-connections-per-uid", str(args.clients + 16)) as target:
        report = run(target, clients=args.clients, seconds=args.seconds)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
