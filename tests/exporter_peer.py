"""An exporter in a process of its own, for the tests: python exporter_peer.py SOCKET NAME MODE

It exports one buffer named NAME of two pages, whose memory is a memfd filled with a pattern,
and prints one JSON line per call it sees (``{"call": op, ...}``) and per command it carries
out. MODE picks how it answers map and cpu access:

- ``good``: the memfd; ``refuse``: attach is refused with EBUSY;
- ``pipe``, ``unsealed``, ``wrongsize``, ``twofds``, ``badsegments``: garbage of that kind;
- ``stall``: sleeps STALL seconds (env, default 3) in map, then answers (late).

Commands on stdin, one a line: ``move`` (to a second pool, then ``buffer.move``),
``revoke``, ``close`` (releases its own hold on the buffer), ``quit``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import threading
import time
from typing import Any

import bufbroker
from bufbroker import Access, BrokerError, Direction, Segment

SIZE = 2 * 4096


_printing = threading.Lock()  # two threads print: calls on the device's, commands on the main one


def say(**values: object) -> None:
    with _printing:
        sys.stdout.write(json.dumps(values) + "\n")
        sys.stdout.flush()


def pool(text: bytes, size: int = SIZE, seal: bool = True) -> int:
    fd = os.memfd_create("pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, text, 0)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Peer(bufbroker.Exporter):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.memory = pool(b"pool A")
        self.spare: list[int] = []  # memfds kept open while a test runs

    def _memory(self) -> Any:
        match self.mode:
            case "pipe":
                r, w = os.pipe()
                self.spare += [r, w]
                return r
            case "unsealed":
                fd = pool(b"unsealed", seal=False)
                self.spare.append(fd)
                return fd
            case "wrongsize":
                fd = pool(b"wrong", size=SIZE * 2)
                self.spare.append(fd)
                return fd
            case "twofds":
                return ([self.memory, self.memory], [Segment(0, SIZE)])
            case "badsegments":
                return (self.memory, [Segment(4096, 4096)])
            case "stall":
                time.sleep(float(os.environ.get("STALL", "3")))
        return self.memory

    def attach(self, attachment: bufbroker.ExporterAttachment) -> None:
        say(call="attach", attachment=attachment.id, device=attachment.device, dynamic=attachment.dynamic)
        if self.mode == "refuse":
            raise BrokerError(errno.EBUSY, "this exporter is busy")

    def detach(self, attachment: bufbroker.ExporterAttachment) -> None:
        say(call="detach", attachment=attachment.id)

    def map(self, attachment: bufbroker.ExporterAttachment, direction: Direction) -> Any:
        say(call="map", attachment=attachment.id, direction=direction.value)
        return self._memory()

    def unmap(self, attachment: bufbroker.ExporterAttachment) -> None:
        say(call="unmap", attachment=attachment.id)

    def begin_cpu_access(self, buffer: int, access: Access) -> Any:
        say(call="begin_cpu_access", buffer=buffer, access=access.value)
        return self._memory()

    def end_cpu_access(self, buffer: int, access: Access) -> None:
        say(call="end_cpu_access", buffer=buffer, access=access.value)

    def release(self, buffer: int) -> None:
        say(call="release", buffer=buffer)

    def error(self, event: dict[str, Any]) -> None:
        say(call="error", op=event["op"], errno=event["errno"])


def main(path: str, name: str, mode: str) -> None:
    peer = Peer(mode)
    with bufbroker.connect("exporter", socket=path, exporter=peer) as dev:
        buf = dev.export(SIZE, name=name)
        say(ready=True, id=buf.id, pid=os.getpid())
        for line in sys.stdin:
            match line.split():
                case ["move", timeout]:
                    peer.memory = pool(b"pool B")
                    started = time.monotonic()
                    late = buf.move(timeout=float(timeout))
                    say(moved=True, late=late, seconds=time.monotonic() - started)
                case ["move"]:
                    try:
                        buf.move(timeout=1.0)
                        say(moved=True)
                    except BrokerError as e:
                        say(moved=False, errno=e.errno)
                case ["revoke"]:
                    buf.revoke()
                    say(revoked=True)
                case ["close"]:
                    buf.close()
                    say(closed=True)
                case ["quit"]:
                    return


if __name__ == "__main__":
    main(*sys.argv[1:])
