"""A second process for the live tests: python holder.py SOCKET NAME.

As device ``encoder`` it opens buffer NAME, attaches and maps it TO_DEVICE twice, allocates a
4 KiB buffer ``enc-out`` and begins RW cpu access on it; prints one JSON line (its pid and the
ids), then holds all of it until a line arrives on stdin (or it is killed).
"""

from __future__ import annotations

import json
import os
import sys

import bufbroker
from bufbroker import Access, Direction


def main(path: str, name: str) -> None:
    with bufbroker.connect("encoder", socket=path) as dev:
        frame = dev.open(name, timeout=10)
        attachment = frame.attach()
        first, second = attachment.map(Direction.TO_DEVICE), attachment.map(Direction.TO_DEVICE)
        out = dev.allocate(4096, name="enc-out")
        access = out.cpu_access(Access.RW)
        access.begin()
        print(json.dumps({"pid": os.getpid(), "frame": frame.id, "out": out.id}), flush=True)
        sys.stdin.readline()
        access.end()
        first.unmap()
        second.unmap()


if __name__ == "__main__":
    main(*sys.argv[1:])
