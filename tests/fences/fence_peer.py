"""Roles for the fence tests' separate processes: python fence_peer.py ROLE ARGS...

Each role prints JSON lines on stdout and, where it must wait, reads lines on stdin. Handles
and fences travel over the socket whose descriptor the test passes as ``fd``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import bufbroker
from bufbroker import Access, Direction


def say(**values: object) -> None:
    print(json.dumps(values), flush=True)


def _sock(fd: str) -> socket.socket:
    return socket.socket(fileno=int(fd))


def signaller(path: str, fd: str, copies: str) -> None:
    """Make a timeline, send ``copies`` handles to it and a fence for point 5, then obey stdin.

    Lines: ``signal P`` or ``signal P ERRNO``; anything else ends the role.
    """
    sock = _sock(fd)
    with bufbroker.connect("signaller", socket=path) as dev:
        tl = dev.timeline(name="work")
        for _ in range(int(copies)):
            handle = tl.share()
            bufbroker.send_handle(sock, handle)
            os.close(handle)
        say(ready=True, id=tl.id, pid=os.getpid())
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] != "signal":
                break
            tl.signal(int(words[1]), error=int(words[2]) if len(words) > 2 else 0)
            say(signalled=int(words[1]))


def promiser(path: str, fd: str, point: str) -> None:
    """Make a timeline, a fence for ``point`` (a promise), send the fence; never signal."""
    sock = _sock(fd)
    with bufbroker.connect("promiser", socket=path) as dev:
        tl = dev.timeline(name="late")
        fence = tl.fence(int(point))
        bufbroker.send_handle(sock, fence.fileno())
        say(ready=True)
        sys.stdin.readline()


def waiter(path: str, fd: str, point: str, timeout: str) -> None:
    """Import a timeline handle, then wait for ``point``; report how it ended and when."""
    handle = bufbroker.recv_handle(_sock(fd))
    with bufbroker.connect("waiter", socket=path) as dev:
        tl = dev.import_timeline(handle)
        os.close(handle)
        say(ready=True)
        try:
            tl.wait(int(point), timeout=float(timeout))
            say(errno=0, at=time.monotonic(), value=tl.value)
        except bufbroker.BrokerError as e:
            say(errno=e.errno, at=time.monotonic(), value=tl.value)


def fence_waiter(path: str, fd: str, timeout: str) -> None:
    """Receive a fence, import it, wait on it; report its status and the errno."""
    received = bufbroker.recv_handle(_sock(fd))
    with bufbroker.connect("fence-waiter", socket=path) as dev:
        fence = dev.import_fence(received)
        os.close(received)
        say(ready=True, status=fence.status)
        try:
            fence.wait(timeout=float(timeout))
            say(errno=0, status=fence.status, at=time.monotonic())
        except bufbroker.BrokerError as e:
            say(errno=e.errno, status=fence.status, at=time.monotonic())


def ping(path: str, fd: str, rounds: str, first: str) -> None:
    """Ping-pong on two timelines: send ours, receive theirs; signal ours after theirs moves.

    The one with ``first`` = 1 starts. Needs no broker once both timelines are imported.
    """
    sock = _sock(fd)
    with bufbroker.connect("ping", socket=path) as dev:
        mine = dev.timeline(name="ping")
        handle = mine.share()
        bufbroker.send_handle(sock, handle)
        os.close(handle)
        received = bufbroker.recv_handle(sock)
        theirs = dev.import_timeline(received)
        os.close(received)
        say(ready=True)
        sys.stdin.readline()  # the test may stop the broker now
        for i in range(1, int(rounds) + 1):
            if first == "1":
                mine.signal(i)
                theirs.wait(i, timeout=10)
            else:
                theirs.wait(i, timeout=10)
                mine.signal(i)
        say(done=True, value=theirs.value)


def writer(path: str, fd: str, size: str) -> None:
    """Allocate, attach a write fence to the buffer, hand out the buffer, then write and signal."""
    sock = _sock(fd)
    n = int(size)
    with bufbroker.connect("writer", socket=path) as dev:
        buf = dev.allocate(n)
        tl = dev.timeline(name="written")
        fence = tl.fence(1)
        buf.attach_fence(fence, Access.WRITE)
        fence.close()
        handle = buf.share()
        bufbroker.send_handle(sock, handle)
        os.close(handle)
        say(ready=True)
        sys.stdin.readline()
        with buf.attach() as att, att.map(Direction.FROM_DEVICE) as m:  # the device writes
            m.memory[:n] = bytes([7]) * n
        tl.signal(1)
        say(signalled=True)
        sys.stdin.readline()


def reader(path: str, fd: str, size: str) -> None:
    """Import a buffer and read it under cpu access READ, which waits for its write fence."""
    handle = bufbroker.recv_handle(_sock(fd))
    n = int(size)
    with bufbroker.connect("reader", socket=path) as dev:
        buf = dev.import_handle(handle)
        os.close(handle)
        say(ready=True)
        with buf.cpu_access(Access.READ, timeout=10) as mem:
            say(sevens=mem[:n].tobytes().count(7), at=time.monotonic())


def parallel(path: str, fd: str, me: str, rounds: str) -> None:
    """sync_stress_parallelism's thread: take turns with the other process through timelines."""
    sock = _sock(fd)
    first = me == "0"
    with bufbroker.connect(f"parallel-{me}", socket=path) as dev:
        handle = bufbroker.recv_handle(sock)
        counter = dev.import_handle(handle)
        os.close(handle)
        mine = dev.timeline()
        handle = mine.share()
        bufbroker.send_handle(sock, handle)
        os.close(handle)
        handle = bufbroker.recv_handle(sock)
        theirs = dev.import_timeline(handle)
        os.close(handle)
        say(ready=True)
        with counter.attach() as att, att.map() as m:
            for i in range(int(rounds)):
                if first:
                    theirs.wait(i, timeout=10)
                else:
                    theirs.wait(i + 1, timeout=10)
                value = int.from_bytes(m.memory[:8], "little")
                assert value == 2 * i + (0 if first else 1), (value, i)
                m.memory[:8] = (value + 1).to_bytes(8, "little")
                mine.signal(i + 1)


def producer(path: str, fd: str, me: str, rounds: str) -> None:
    """sync_stress_consumer's producer: wait for the consumer, count, signal our own timeline."""
    sock = _sock(fd)
    k = int(me)
    with bufbroker.connect(f"producer-{me}", socket=path) as dev:
        handle = bufbroker.recv_handle(sock)
        counters = dev.import_handle(handle)
        os.close(handle)
        handle = bufbroker.recv_handle(sock)
        consumer = dev.import_timeline(handle)
        os.close(handle)
        mine = dev.timeline()
        handle = mine.share()
        bufbroker.send_handle(sock, handle)
        os.close(handle)
        with counters.attach() as att, att.map() as m:
            for i in range(int(rounds)):
                consumer.wait(i, timeout=10)
                slot = m.memory[8 * k : 8 * k + 8]
                slot[:] = (int.from_bytes(slot, "little") + 1).to_bytes(8, "little")
                slot.release()
                mine.signal(i + 1)


def stranger(path: str, uid: str) -> None:
    """Another uid: make a timeline and a fence, signal, wait; report what it saw."""
    os.setgid(int(uid))
    os.setuid(int(uid))
    with bufbroker.connect("stranger", socket=path) as dev:
        tl = dev.timeline(name="mine")
        fence = tl.fence(1)
        tl.signal(1)
        fence.wait(timeout=5)
        say(ok=True, timelines=[t["name"] for t in dev.timelines()], usage=dev.stats()["usage"])


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    globals()[role](*args)
