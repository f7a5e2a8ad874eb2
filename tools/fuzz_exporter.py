"""Fuzzing exporter answers: a raw exporter answers the broker's calls at random while an
honest importer keeps attaching, mapping and reading its buffers.

The exporter answers right, refuses with any errno, answers twice, answers a call it never
got, sends garbage maps with descriptors of every kind (``fuzz._random_fds``), and now and
then a frame that is not a message at all, after which the broker hangs up on it and it
comes back. The importer may get any error the exporter chose, EIO, ENODEV (a revoked
buffer) or ENOENT (between a hang-up and the next export), but never a dropped connection,
and whatever it maps must hold the exporter's bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

import bufbroker
from bufbroker import Access, Direction, protocol

SIZE = 2 * 4096
MARK = b"exported"
# What the importer may see: anything the exporter refused with, and these.
EXPECTED = {errno.EIO, errno.ENODEV, errno.ENOENT, errno.EBADF, errno.EINVAL, errno.EAGAIN, errno.ETIMEDOUT}


@dataclass
class ExporterReport:
    name: str = ""  # what the exporter's buffer is called now (a new name each time it comes back)
    calls: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    maps: int = 0
    importer_errors: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def _memfd() -> int:
    fd = os.memfd_create("fuzz-exporter", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, MARK, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _packb(value: object) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


class _RawExporter:
    """An exporter speaking the protocol by hand, so that it can say anything."""

    def __init__(self, path: str, name: str) -> None:
        """Connect, say hello as an exporter and export one buffer called ``name``."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sock.settimeout(10)
        self.sock.send(_packb([0, 1, "hello", {"version": 1, "name": "fuzz-exporter", "exporter": True}]))
        welcome, _ = self._recv()
        assert welcome[2].get("exporter") is True, welcome
        self.sock.send(_packb([0, 2, "export", {"size": SIZE, "name": name}]))
        _, fds = self._recv()
        protocol.close_all(fds)  # the exporter's own reference keeps the buffer alive
        self.sock.setblocking(False)

    def _recv(self) -> tuple[Any, list[int]]:
        data, ancdata, flags, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(64))
        fds = protocol.fds_from_ancillary(ancdata, flags, 16)
        return (msgpack.unpackb(data) if data else None), fds

    def close(self) -> None:
        self.sock.close()


def _answer(
    rng: random.Random, call_id: int, memfd: int, random_fds: Callable[[], list[int]]
) -> tuple[str, bytes, list[int]]:
    """One answer of a random kind: (its kind, the packet, fresh descriptors to close after)."""
    kinds = ["good"] * 4 + ["garbage"] * 3 + ["refuse", "twice", "stranger", "noise"]
    kind = rng.choice(kinds)
    if kind in ("good", "twice"):
        return kind, _packb([5, call_id, {}]), [os.dup(memfd)]
    if kind == "refuse":
        number = rng.choice([errno.EBUSY, errno.EINVAL, errno.ENOMEM, 0, -1, 70000])
        return kind, _packb([6, call_id, {"errno": number, "code": "EBUSY", "message": "no"}]), []
    if kind == "stranger":  # an answer to a call nobody made, then the right one
        stray = _packb([5, rng.randrange(1 << 40), {}])
        return kind, stray, [os.dup(memfd)]
    if kind == "garbage":
        result = rng.choice(
            [{}, {"segments": [[0, 0, SIZE]]}, {"segments": [[1, 0, 1]]}, [], "x", None, {"z": 1}]
        )
        return kind, _packb([5, call_id, result]), random_fds()
    return kind, rng.randbytes(rng.randrange(1, 40)), []


def exporter_loop(
    path: str,
    name: str,
    seed: int,
    stop: threading.Event,
    report: ExporterReport,
    random_fds: Callable[[], list[int]],
) -> None:
    rng = random.Random(seed)
    memfd = _memfd()
    report.name = f"{name}-0"
    raw = _RawExporter(path, report.name)
    try:
        while not stop.is_set():
            ready, _, _ = select.select([raw.sock], [], [], 0.05)
            if not ready:
                continue
            try:
                message, fds = raw._recv()
            except BlockingIOError:
                continue
            except OSError:
                message, fds = None, []
            protocol.close_all(fds)
            if message is None:  # hung up on (it sent noise): come back
                raw.close()
                report.reconnects += 1
                report.name = f"{name}-{report.reconnects}"
                raw = _RawExporter(path, report.name)
                continue
            if message[0] != 4 or message[1] is None:
                continue  # an event or a notice
            report.calls += 1
            kind, packet, extra = _answer(rng, message[1], memfd, random_fds)
            report.answers[kind] += 1
            try:
                for _ in range(2 if kind == "twice" else 1):
                    raw.sock.sendmsg([packet], protocol.ancillary(extra))
                if kind == "stranger":
                    raw.sock.sendmsg([_packb([5, message[1], {}])], protocol.ancillary(extra))
            except OSError:
                pass
            finally:
                protocol.close_all(extra)
    finally:
        raw.close()
        os.close(memfd)


def importer_loop(path: str, seed: int, stop: threading.Event, report: ExporterReport) -> None:
    rng = random.Random(seed)
    try:
        with bufbroker.connect("fuzz-importer", socket=path) as dev:
            while not stop.is_set():
                try:
                    buf = dev.open(report.name, timeout=1.0)
                except bufbroker.BrokerError as e:
                    report.importer_errors[e.code] += 1
                    continue
                try:
                    _use(rng, buf, report)
                finally:
                    buf.close()
    except bufbroker.BrokerError as e:
        report.errors.append(f"the importer lost its connection: {e!r}")


def _use(rng: random.Random, buf: bufbroker.Buffer, report: ExporterReport) -> None:
    try:
        if rng.random() < 0.3:
            with buf.cpu_access(Access.READ) as mem:
                _check(bytes(mem[: len(MARK)]), report)
            return
        with buf.attach(on_move=None) as att, att.map(rng.choice(list(Direction))) as m:
            _check(bytes(m.memory[: len(MARK)]), report)
    except bufbroker.ProtocolError as e:
        report.errors.append(f"the importer got a protocol error: {e!r}")
    except bufbroker.BrokerError as e:
        if e.errno == errno.ECONNRESET:
            raise
        report.importer_errors[e.code] += 1


def _check(data: bytes, report: ExporterReport) -> None:
    report.maps += 1
    if data != MARK:
        report.errors.append(f"the importer read {data!r}, not the exporter's bytes")


def start(
    path: str, seed: int, random_fds: Callable[[], list[int]]
) -> tuple[Callable[[], None], ExporterReport]:
    """Start one fuzzing exporter and one importer; returns the function that stops them.

    The importer stops first, so that no call of its waits on an exporter that stopped.
    """
    report = ExporterReport()
    stop_importer, stop_exporter = threading.Event(), threading.Event()
    exporter = threading.Thread(
        target=exporter_loop, args=(path, f"fuzzed-{seed}", seed, stop_exporter, report, random_fds)
    )
    exporter.start()
    while not report.name:
        stop_exporter.wait(0.01)
    importer = threading.Thread(target=importer_loop, args=(path, seed + 1, stop_importer, report))
    importer.start()

    def stop() -> None:
        stop_importer.set()
        importer.join()
        stop_exporter.set()
        exporter.join()

    return stop, report
