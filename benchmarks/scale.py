"""(d) Op latency and broker RSS with 10, 1,000 and 9,000 live buffers; (e) broker RSS per
buffer and per connection.

Each live buffer costs the broker about two descriptors (its memfd once mapped, its end of the
handle); the hard RLIMIT_NOFILE here is 20,000, so the benchmark raises its own soft limit to
the hard one (the broker does the same) and starts the broker with --max-buffers-per-uid 10000.
"""

from __future__ import annotations

import time

import bufbroker
from bufbroker import Access, Direction

from ._harness import Row, Settings, against, broker, interleave, raise_nofile, rss_kib, summarize
from .roundtrip import timed

LEVELS = (10, 1_000, 9_000)
QUICK_LEVELS = (10, 200)


def _settle(pid: int) -> int:
    time.sleep(0.3)  # let the broker finish closing what it was told about
    return rss_kib(pid)


def run(settings: Settings) -> list[Row]:
    limit = raise_nofile()
    levels = QUICK_LEVELS if settings.quick else LEVELS
    rows: list[Row] = []
    with (
        broker("--max-buffers-per-uid", "10000") as b,
        bufbroker.connect("bench", socket=b.socket) as dev,
        bufbroker.connect("filler", socket=b.socket) as filler,
    ):
        probe = dev.allocate(4096)

        def attach_map() -> None:
            att = probe.attach()
            att.map(Direction.TO_DEVICE).unmap()
            att.detach()

        held: list[bufbroker.Buffer] = []
        base_rss = _settle(b.pid)
        per_level: dict[int, dict[str, Row]] = {}
        rss: dict[int, int] = {}
        for level in levels:
            while len(held) < level:
                buf = filler.allocate(4096)
                with buf.cpu_access(Access.WRITE) as mem:  # backed: the memfd exists too
                    mem[0] = 1
                held.append(buf)
            rss[level] = _settle(b.pid)
            samples = interleave(
                {"ping": timed(dev.ping), "attach+map+unmap+detach": timed(attach_map, 25)},
                rounds=settings.n(100, 5),
                warmup=settings.n(5, 1),
            )
            per_level[level] = {n: summarize("scale", n, f"{level} buffers", xs) for n, xs in samples.items()}
        for name in ("ping", "attach+map+unmap+detach"):
            first = per_level[levels[0]][name]
            for level in levels:
                row = per_level[level][name]
                rows.append(against(row, first) if level != levels[0] else row)
                if level != levels[0]:
                    row.baseline = f"{levels[0]} buffers"
        per_buffer = (rss[levels[-1]] - rss[levels[0]]) * 1024 / (levels[-1] - levels[0])
        for level in levels:
            rows.append(Row("memory", "broker RSS", f"{level} buffers", "KiB", rss[level], rss[level]))
        rows.append(
            Row(
                "memory",
                "broker RSS per buffer",
                "allocated and mapped once",
                "bytes",
                per_buffer,
                per_buffer,
                note=f"soft fd limit raised to {limit}",
            )
        )
        del held
    # A broker of its own: the first one may still be giving back the memory of 9,000 buffers.
    with broker("--max-connections-per-uid", "1000") as b:
        connections = 50 if settings.quick else 200
        with bufbroker.connect("warm-up", socket=b.socket) as warm_up:
            warm_up.ping()  # the first connection's one-time costs are not per connection
        before = _settle(b.pid)
        extra = [bufbroker.connect(f"c{i}", socket=b.socket) for i in range(connections)]
        after = _settle(b.pid)
        for c in extra:
            c.close()
        per_connection = (after - before) * 1024 / connections
        rows.append(
            Row(
                "memory",
                "broker RSS per connection",
                f"{connections} idle devices",
                "bytes",
                per_connection,
                per_connection,
            )
        )
        rows.append(Row("memory", "broker RSS", "empty", "KiB", base_rss, base_rss))
    return rows
