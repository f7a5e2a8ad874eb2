"""docs/PROTOCOL.md is enough to write a client: a client of a socket and msgpack alone (no
bufbroker code) replays the document's byte-by-byte session against a real broker and gets
exactly the answers the document shows."""

from __future__ import annotations

import array
import json
import mmap
import os
import re
import socket
from pathlib import Path

import msgpack

from conftest import Broker

DOC = Path(__file__).parent.parent / "docs" / "PROTOCOL.md"


def session() -> list[tuple[str, object, int]]:
    """The session's lines: (direction, message, descriptors the packet carries)."""
    text = DOC.read_text()
    block = text.split("## A session, byte by byte", 1)[1].split("```")[3]
    lines = []
    for line in block.splitlines():
        match = re.fullmatch(r"([→←]) (\[.*\])\s*(?:\+ (\d+) fds? .*)?", line.strip())
        if match:
            lines.append((match[1], json.loads(match[2]), int(match[3] or 0)))
    return lines


def test_the_documented_bytes_are_the_first_two_messages() -> None:
    text = DOC.read_text()
    block = text.split("## A session, byte by byte", 1)[1].split("```")[1]
    packets = [bytes.fromhex(part.replace("\n", " ")) for part in re.split(r"[→←]", block) if part.strip()]
    assert [msgpack.unpackb(p) for p in packets] == [message for _, message, _ in session()[:2]]
    assert packets[0] == msgpack.packb(session()[0][1])


def test_the_documented_session_replays_as_written(broker: Broker) -> None:
    steps = session()
    assert len(steps) >= 10 and steps[0][1][2] == "hello"  # type: ignore[index]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(broker.socket)
    received: list[int] = []
    try:
        for direction, message, nfds in steps:
            if direction == "→":
                sock.send(msgpack.packb(message))
                continue
            data, ancdata, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, payload in ancdata:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            received.extend(fds)
            assert not flags & socket.MSG_CTRUNC
            assert msgpack.unpackb(data) == message
            assert len(fds) == nfds
        # The mapped descriptor is the buffer's memory, as the document says.
        with mmap.mmap(received[-1], 1 << 20) as memory:
            memory[:5] = b"hello"
            assert memory[:5] == b"hello"
    finally:
        for fd in received:
            os.close(fd)
        sock.close()
