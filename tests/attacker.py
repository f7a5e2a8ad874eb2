"""A hostile local user, as a separate process of another uid: python attacker.py ROLE UID ARGS...

Each role drops to UID first, does its worst to the broker, prints what it achieved as JSON
lines, and then holds on to everything until a line arrives on stdin (or it is killed).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

import msgpack

import bufbroker


def say(**values: object) -> None:
    print(json.dumps(values), flush=True)


def _drop(uid: str) -> None:
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))


def fill_handles(path: str) -> None:
    """Share one buffer until the broker says no: how many, and with which errno."""
    dev = bufbroker.connect("hoarder", socket=path)
    buf = dev.allocate(4096)
    handles = []
    while True:
        try:
            handles.append(buf.share())
        except bufbroker.BrokerError as e:
            say(shared=len(handles), errno=e.errno)
            break
        except OSError as e:  # the attacker's own table: not what is tested
            say(shared=len(handles), errno=e.errno, own=True)
            break
    sys.stdin.readline()


def silent(path: str, count: str) -> None:
    """Open ``count`` connections that never say hello: how many the broker refused at once."""
    kept, refused = [], 0
    for _ in range(int(count)):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.settimeout(0.3)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            kept.append(sock)  # waiting for its hello: it holds a handshake slot
            continue
        reply = msgpack.unpackb(data) if data else None
        if reply and reply[0] == 2 and reply[2]["errno"] == errno.EAGAIN:
            refused += 1
        sock.close()
    say(kept=len(kept), refused=refused)
    sys.stdin.readline()


def squat(path: str, handle: str, victim_name: str) -> None:
    """Given a read-only handle to the victim's buffer: rename it, squat its name, probe names."""
    with bufbroker.connect("squatter", socket=path) as dev:
        theirs = dev.import_handle(int(handle))
        os.close(int(handle))
        try:
            theirs.set_name("renamed-by-attacker")
            renamed = 0
        except bufbroker.BrokerError as e:
            renamed = e.errno or 0
        mine = dev.allocate(4096, name=victim_name)
        probes = {}
        for name in (victim_name + "-private", "no-such-name"):
            try:
                dev.open(name)
                probes[name] = 0
            except bufbroker.BrokerError as e:
                probes[name] = e.errno or 0
        say(
            renamed=renamed,
            mine=mine.id,
            probes=probes,
            imported={"name": theirs.name, "exporter": theirs.exporter},
            buffers=dev.buffers(),
            devices=dev.devices(),
        )
        sys.stdin.readline()


if __name__ == "__main__":
    role, uid, *args = sys.argv[1:]
    _drop(uid)
    globals()[role](*args)
