"""(d) Op latency and broker RSS with 10, 1,000 and 9,000 live buffers; (e) broker RSS per
buffer and per connection.

Each live buffer costs the broker about two descriptors (its memfd once mapped, its end of the
handle); the hard RLIMIT_NOFILE here is 20,000, so the benchmark raises its own soft limit to
the hard one (the broker does the same) and starts the broker with --max-buffers-per-uid 10000.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import bufbroker
from bufbroker import Access, Direction

from ._harness import Row, Settings, against, broker, interleave, raise_nofile, rss_kib, summarize
from .roundtrip import timed

LEVELS = (10, 1_000, 9_000)
QUICK_LEVELS = (10, 200)


def _settle(pid: int) -> int:
    time.sleep(0.3)  # let the broker finish closing what it was told about
    return rss_kib(pid)


def _fill(device: bufbroker.Device, held: list[bufbroker.Buffer], level: int) -> None:
    while len(held) < level:
        buf = device.allocate(4096)
        with buf.cpu_access(Access.WRITE) as mem:  # backed: the memfd exists too
            mem[0] = 1
        held.append(buf)


def _cases(dev: bufbroker.Device) -> dict[str, Callable[[], float]]:
    probe = dev.allocate(4096)

    def attach_map() -> None:
        att = probe.attach()
        att.map(Direction.TO_DEVICE).unmap()
        att.detach()

    return {"ping": timed(dev.ping), "attach+map+unmap+detach": timed(attach_map, 25)}


def run(settings: Settings) -> list[Row]:
    limit = raise_nofile()
    levels = QUICK_LEVELS if settings.quick else LEVELS
    rows: list[Row] = []
    with (
        broker("--max-buffers-per-uid", "10000", "--max-handles-per-uid", "20000") as b,
        broker() as beside,
        bufbroker.connect("bench", socket=b.socket) as dev,
        bufbroker.connect("filler", socket=b.socket) as filler,
        bufbroker.connect("bench", socket=beside.socket) as dev_beside,
        bufbroker.connect("filler", socket=beside.socket) as filler_beside,
    ):
        # Each level is timed in the same rounds as a second broker that keeps the first
        # level's buffers: the ratio compares two brokers measured side by side, not two
        # stretches of time on a machine whose speed drifts.
        held: list[bufbroker.Buffer] = []
        _fill(filler_beside, [], levels[0])
        ours, theirs = _cases(dev), _cases(dev_beside)
        base_rss = _settle(b.pid)
        rss: dict[int, int] = {}
        timed_rows: dict[str, list[Row]] = {name: [] for name in ours}
        for level in levels:
            _fill(filler, held, level)
            rss[level] = _settle(b.pid)
            samples = interleave(
                {**ours, **{f"{name} beside": sample for name, sample in theirs.items()}},
                rounds=settings.n(100, 5),
                warmup=settings.n(5, 1),
            )
            for name in ours:
                row = summarize("scale", name, f"{level} buffers", samples[name])
                baseline = summarize("scale", name, f"{levels[0]} buffers", samples[f"{name} beside"])
                timed_rows[name].append(against(row, baseline))
                row.baseline = f"{levels[0]} buffers, in the same rounds"
                row.note = f"{levels[0]} buffers: {baseline.p50:,.1f} µs"
        rows += [row for group in timed_rows.values() for row in group]
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
