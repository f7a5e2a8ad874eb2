"""Roles for stream peers in the tests: python stream_peer.py ROLE ARGS...

Each role prints JSON lines on stdout and, where it must wait, reads lines on stdin.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import sys
import time

import bufbroker
from bufbroker import protocol as p


def say(**values: object) -> None:
    print(json.dumps(values), flush=True)


def wait_for(word: str) -> None:
    while sys.stdin.readline().strip() != word:
        pass


def content(seq: int, size: int) -> bytes:
    """What frame ``seq`` holds: its number over and over, in a length that varies with it."""
    n = 1 + (seq * 7919) % size
    return (seq.to_bytes(8, "little") * (n // 8 + 1))[:n]


def publish(path: str, name: str, size: str, slots: str, count: str) -> None:
    """Publish; on "prime" learn the subscribers; on "go" send ``count`` frames; exit on "end"."""
    dev = bufbroker.connect("publisher", socket=path)
    with dev, dev.publish(name, size=int(size), slots=int(slots)) as pub:
        say(ready=True)
        while (word := sys.stdin.readline().strip()) != "go":
            if word == "prime":
                pub.loan(timeout=10).discard()  # asks who subscribes: no broker message after this
                say(primed=pub.subscribers)
        for _ in range(int(count)):
            with pub.loan(timeout=10) as frame:
                data = content(frame.seq, int(size))
                frame.memory[: len(data)] = data
                frame.send(len(data))
        say(sent=int(count))
        wait_for("end")


def subscribe(path: str, name: str, count: str) -> None:
    """Receive ``count`` frames, checking each one's bytes; report their numbers."""
    with bufbroker.connect("subscriber", socket=path) as dev, dev.subscribe(name, timeout=10) as sub:
        say(start=sub.start)
        seqs, bad = [], 0
        for _ in range(int(count)):
            with sub.receive(timeout=10) as frame:
                seqs.append(frame.seq)
                bad += bytes(frame.memory) != content(frame.seq, sub.size)
        say(seqs=seqs, bad=bad)
        wait_for("end")


def step(path: str, name: str) -> None:
    """Receive one frame per "next" line and give it back; report it (or the error)."""
    with bufbroker.connect("stepper", socket=path) as dev, dev.subscribe(name, timeout=10) as sub:
        say(start=sub.start)
        while sys.stdin.readline().strip() == "next":
            try:
                with sub.receive(timeout=10) as frame:
                    say(seq=frame.seq, first=frame.memory[0] if frame.size else None)
            except bufbroker.BrokerError as e:
                say(errno=e.errno)


def hold(path: str, name: str) -> None:
    """Receive one frame and keep it until killed."""
    dev = bufbroker.connect("holder", socket=path)
    sub = dev.subscribe(name, timeout=10)
    say(start=sub.start)
    frame = sub.receive(timeout=10)
    say(holding=frame.seq)
    time.sleep(3600)


def write(path: str, name: str) -> None:
    """Try to write into a received frame: through Python, then by asking the kernel."""
    with bufbroker.connect("writer", socket=path) as dev, dev.subscribe(name, timeout=10) as sub:
        say(start=sub.start)
        with sub.receive(timeout=10) as frame:
            try:
                frame.memory[0] = 1
                python = "wrote"
            except TypeError:
                python = "refused"
            say(python=python, readonly=frame.memory.readonly, kernel=_mprotect_pool())


def _mprotect_pool() -> str:
    """Ask the kernel to make this process's mapping of the pool writable: EACCES expected."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "bufbroker:stream:" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if libc.mprotect(start, end - start, mmap.PROT_READ | mmap.PROT_WRITE) == 0:
                    return "writable"
                return errno.errorcode[ctypes.get_errno()]
    return "no mapping"


def publish_until_killed(path: str, name: str, size: str, slots: str, count: str) -> None:
    """Send ``count`` frames, then wait to be killed."""
    dev = bufbroker.connect("doomed", socket=path)
    pub = dev.publish(name, size=int(size), slots=int(slots))
    say(ready=True)
    wait_for("go")
    for _ in range(int(count)):
        with pub.loan(timeout=10) as frame:
            data = content(frame.seq, int(size))
            frame.memory[: len(data)] = data
            frame.send(len(data))
    say(sent=int(count))
    time.sleep(3600)


def stranger(path: str, uid: str, name: str) -> None:
    """As another uid: the stream ``name`` of uid 0 is not there, and is not ours to end."""
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
    with bufbroker.connect("stranger", socket=path) as dev:
        result: dict[str, object] = {}
        for what, call in (
            ("subscribe", lambda: dev.subscribe(name)),
            ("unpublish", lambda: dev._call(p.Unpublish(stream=1))),
            ("unsubscribe", lambda: dev._call(p.Unsubscribe(subscriber=1))),
            ("members", lambda: dev._call(p.StreamMembers(stream=1))),
        ):
            try:
                call()
                result[what] = 0
            except bufbroker.BrokerError as e:
                result[what] = e.errno
        with dev.publish(name, size=10, slots=1):  # names are per uid
            result["listed"] = [s["name"] for s in dev.streams()]
            result["usage"] = dev.stats()["usage"]["streams"]
        say(**result)


def fill_streams(path: str, uid: str) -> None:
    """As another uid: publish streams until the broker says no; how many, and with which errno."""
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
    dev = bufbroker.connect("hoarder", socket=path)
    streams = []
    while True:
        try:
            streams.append(dev.publish(f"s{len(streams)}", size=10, slots=1))
        except bufbroker.BrokerError as e:
            say(published=len(streams), errno=e.errno)
            break
    sys.stdin.readline()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {
        "publish": publish,
        "subscribe": subscribe,
        "step": step,
        "hold": hold,
        "write": write,
        "publish_until_killed": publish_until_killed,
        "stranger": stranger,
        "fill_streams": fill_streams,
    }[role](*args)
