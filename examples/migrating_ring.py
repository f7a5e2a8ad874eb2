"""An exporter in a process of its own: a ring of frames whose memory migrates between two pools.

    python examples/migrating_ring.py [--socket PATH] [--frames 4] [--size 65536] [--every SECONDS]

The process owns the memory: two pools (think of VRAM and system RAM, or two NUMA nodes),
each a sealed memfd per frame. It exports one buffer per frame (``ring-0``, ``ring-1``, ...)
whose ops it answers itself, as a driver's ``dma_buf_ops`` do: ``map`` hands out the frame's
memfd in whichever pool holds it now. Every line on stdin (or every ``--every`` seconds)
migrates the whole ring to the other pool: copy each frame, switch where ``map`` points,
then ``buffer.move()``, which tells every dynamic importer to unmap and map again and returns
once none maps the old pool (or names the late ones). An importer that attached statically
pins its frame: that frame stays where it is (``move`` → EBUSY). Ends at end of input.

An importer, for a try::

    import bufbroker
    dev = bufbroker.connect("viewer")
    frame = dev.open("ring-0", timeout=5)
    mappings = {}
    def on_move(att):
        mappings[att.id].unmap()
        mappings[att.id] = att.map(bufbroker.Direction.TO_DEVICE)
    att = frame.attach(on_move=on_move)
    mappings[att.id] = att.map(bufbroker.Direction.TO_DEVICE)
    bytes(mappings[att.id].memory[:16])      # b'pool A frame 0 ' ... then b'pool B frame 0 '
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import mmap
import os
import select
import sys
import threading
import time

import bufbroker
from bufbroker import Access, BrokerError, Direction
from bufbroker.protocol import page_round


class Pool:
    """One kind of memory: a sealed memfd per frame, mapped here so that we can copy."""

    def __init__(self, label: str, frames: int, size: int) -> None:
        self.label = label
        self.memfds = []
        self.maps = []
        for i in range(frames):
            fd = os.memfd_create(f"ring-{label}-{i}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            # Sealed against shrinking and growing: no importer's mapping can SIGBUS.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.memfds.append(fd)
            self.maps.append(mmap.mmap(fd, size))


class Ring(bufbroker.Exporter):
    """The ops of the ring's buffers: memory from whichever pool holds each frame now."""

    def __init__(self, frames: int, size: int) -> None:
        self.size = page_round(size)
        self.pools = {"A": Pool("A", frames, self.size), "B": Pool("B", frames, self.size)}
        self.where = ["A"] * frames  # which pool holds frame i
        self.index: dict[int, int] = {}  # buffer id -> frame number
        # Calls come on the device's own thread, maybe before export() has returned here.
        self.lock = threading.Lock()

    def memfd(self, buffer: int) -> int:
        with self.lock:
            frame = self.index[buffer]
            return self.pools[self.where[frame]].memfds[frame]

    def map(self, attachment: bufbroker.ExporterAttachment, direction: Direction) -> int:
        return self.memfd(attachment.buffer)

    def begin_cpu_access(self, buffer: int, access: Access) -> int:
        return self.memfd(buffer)

    def release(self, buffer: int) -> None:
        with self.lock:
            self.index.pop(buffer, None)

    def stamp(self, frame: int) -> None:
        pool = self.pools[self.where[frame]]
        header = f"pool {pool.label} frame {frame} ".encode()
        pool.maps[frame][: len(header)] = header


def migrate(ring: Ring, buffers: list[bufbroker.Buffer], timeout: float) -> dict[str, object]:
    """Move every frame to the other pool; what happened, frame by frame."""
    report: dict[str, object] = {}
    for frame, buf in enumerate(buffers):
        old = ring.where[frame]
        new = "B" if old == "A" else "A"
        with ring.lock:
            ring.pools[new].maps[frame][:] = ring.pools[old].maps[frame][:]  # copy, then switch
            ring.where[frame] = new
            ring.stamp(frame)
        try:
            late = buf.move(timeout=timeout)
            report[buf.name or str(buf.id)] = {"pool": new, "late": [entry["name"] for entry in late]}
        except BrokerError as e:
            if e.errno != errno.EBUSY:
                raise
            with ring.lock:
                ring.where[frame] = old  # pinned by a static attachment: it stays where it is
            report[buf.name or str(buf.id)] = {"pool": old, "pinned": True}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="the broker's socket [default: the usual path]")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64 << 10)
    parser.add_argument("--every", type=float, help="also migrate every SECONDS")
    parser.add_argument("--timeout", type=float, default=2.0, help="how long importers have to re-map")
    args = parser.parse_args(argv)
    ring = Ring(args.frames, args.size)
    with bufbroker.connect("ring", socket=args.socket, exporter=ring) as dev:
        buffers = []
        for frame in range(args.frames):
            with ring.lock:
                buf = dev.export(ring.size, name=f"ring-{frame}")
                ring.index[buf.id] = frame
                ring.stamp(frame)
            buffers.append(buf)
        print(json.dumps({"ready": [b.name for b in buffers]}), flush=True)
        next_at = time.monotonic() + args.every if args.every else None
        while True:
            wait = None if next_at is None else max(0.0, next_at - time.monotonic())
            ready, _, _ = select.select([sys.stdin], [], [], wait)
            if ready and not sys.stdin.readline():
                return 0  # end of input
            print(json.dumps(migrate(ring, buffers, args.timeout)), flush=True)
            if next_at is not None:
                next_at = time.monotonic() + args.every


if __name__ == "__main__":
    raise SystemExit(main())
