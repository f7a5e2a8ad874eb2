"""Roles for separate peer processes in the tests: python peer.py ROLE ARGS...

Each role prints JSON lines on stdout and, where it must wait, reads lines on stdin.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

import bufbroker
from bufbroker import Access, Direction


def say(**values: object) -> None:
    print(json.dumps(values), flush=True)


def pattern(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


def produce(path: str, fd: str, size: str) -> None:
    """Allocate, fill with a pattern, send a handle over socket fd, close everything, exit."""
    n = int(size)
    sock = socket.socket(fileno=int(fd))
    with bufbroker.connect("producer", socket=path) as dev:
        buf = dev.allocate(n)
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:n] = pattern(n)
        handle = buf.share()
        bufbroker.send_handle(sock, handle)
        os.close(handle)
        say(id=buf.id, sha=hashlib.sha256(pattern(n)).hexdigest())


def consume(path: str, fd: str, size: str) -> None:
    """Receive a handle, import, attach, map TO_DEVICE, report a digest of the bytes."""
    n = int(size)
    sock = socket.socket(fileno=int(fd))
    handle = bufbroker.recv_handle(sock)
    with bufbroker.connect("consumer", socket=path) as dev:
        buf = dev.import_handle(handle)
        os.close(handle)
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            say(id=buf.id, sha=hashlib.sha256(m.memory[:n]).hexdigest(), readonly=m.memory.readonly)
        buf.close()


def hold(path: str, name: str) -> None:
    """Allocate a named buffer, attach, map and begin cpu access; then wait to be killed."""
    dev = bufbroker.connect("holder", socket=path)
    buf = dev.allocate(1 << 20, name=name)
    att = buf.attach()
    m = att.map(Direction.BIDIRECTIONAL)
    m.memory[:4] = b"mine"
    access = buf.cpu_access(Access.READ)
    access.begin()
    say(id=buf.id, ready=True)
    time.sleep(3600)


def reopen_as(path_fd: str, uid: str) -> None:
    """Drop to another uid, then try to reopen inherited fd read-write through /proc."""
    os.setgid(int(uid))
    os.setuid(int(uid))
    try:
        os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR)
        say(reopened=True)
    except OSError as e:
        say(reopened=False, errno=e.errno)


def open_as(path: str, uid: str, name: str) -> None:
    """Drop to another uid, then open a buffer by name."""
    os.setgid(int(uid))
    os.setuid(int(uid))
    with bufbroker.connect("stranger", socket=path) as dev:
        try:
            dev.open(name)
            say(opened=True)
        except bufbroker.BrokerError as e:
            say(opened=False, errno=e.errno)


def inspect_as(path: str, uid: str, handle: str) -> None:
    """Drop to another uid, allocate, import the inherited handle, report what it sees.

    Stays connected until a line arrives on stdin, so that the other side can look too.
    """
    os.setgid(int(uid))
    os.setuid(int(uid))
    with bufbroker.connect("stranger", socket=path) as dev:
        own = dev.allocate(3 * 4096)
        held = dev.import_handle(int(handle))
        os.close(int(handle))
        say(own=own.id, held=held.id, buffers=dev.buffers(), devices=dev.devices(), stats=dev.stats())
        sys.stdin.readline()


def get_sealed(path: str, name: str, timeout: str) -> None:
    """Plasma's get: wait for a sealed buffer by name, then report its flags and bytes' digest."""
    with bufbroker.connect("getter", socket=path) as dev:
        say(waiting=True)
        try:
            buf = dev.open(name, sealed=True, timeout=float(timeout))
        except bufbroker.BrokerError as e:
            say(errno=e.errno)
            return
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            digest = hashlib.sha256(m.memory).hexdigest()
        say(sealed=buf.sealed, size=buf.size, sha=digest)


def map_as(path: str, uid: str, handle: str) -> None:
    """Drop to another uid, import the inherited handle, try to map it each way."""
    os.setgid(int(uid))
    os.setuid(int(uid))
    with bufbroker.connect("stranger", socket=path) as dev:
        buf = dev.import_handle(int(handle))
        os.close(int(handle))
        seen: dict[str, object] = {}
        with buf.attach() as att:
            for direction in Direction:
                try:
                    with att.map(direction) as m:
                        seen[direction.value] = hashlib.sha256(m.memory).hexdigest()
                except bufbroker.BrokerError as e:
                    seen[direction.value] = e.errno
        say(**seen)


def write_mapped(path: str, name: str) -> None:
    """Open a buffer by name, map it for writing, say so, then wait to be killed."""
    dev = bufbroker.connect("writer", socket=path)
    buf = dev.open(name)
    m = buf.attach().map(Direction.BIDIRECTIONAL)
    m.memory[:6] = b"writer"
    say(mapped=True)
    time.sleep(3600)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    globals()[role](*args)
