"""A live fuzzer: clients send random and mutated frames with descriptors of every kind while a
well-behaved client keeps doing real work; afterwards the broker's descriptors and memory are
back where they started, and no dead handle imports. The descriptors include copies of live
timeline handles and fences, and the good client's work includes timelines, fences and a
reservation that a cpu access waits on.

An exporter answers the broker's calls at random meanwhile, while an importer maps its
buffers (``fuzz_exporter``): no answer may cost the importer its connection or give it
memory that is not the exporter's.

Handles come live (copies of the good client's) and dead. A live broker never closes its end
of a handle while a copy is open anywhere, so a handle is dead when the broker that minted it
is gone: the fuzzer mints some from a broker of its own and stops it first. To the kernel that
is a socketpair end whose peer is closed; bare ones of those are sent too.

    python -m tools.fuzz --frames 1000000 [--clients 8] [--seed N]
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import random
import select
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

import msgpack

import bufbroker
from bufbroker import Access, Direction, protocol

from . import fuzz_exporter
from ._common import Target, own_broker

OPS = [*sorted(protocol.OPS), "", "nonsense", "hello"]
VALUES: list[object] = [
    0,
    1,
    -1,
    2**63,
    2**64 - 1,
    4096,
    1 << 40,
    "",
    "x" * 40,
    "to_device",
    "read",
    None,
    True,
    1.5,
    float("nan"),
    [],
    {},
    {"max_segments": 0},
    {"ref": 1},
    {"ref": 0},
    {"ref": -1},
    {"ref": 1, "x": 2},
    b"\x00" * 8,
    [1, 2, 3],
    [2**63],
    list(range(5000)),
]
KEYS = [
    "size",
    "name",
    "heap",
    "buffer",
    "attachment",
    "direction",
    "access",
    "readonly",
    "timeout",
    "uid",
    "after",
    "version",
    "constraints",
    "timeline",
    "point",
    "have",
    "bogus",
]


@dataclass
class Report:
    frames: int = 0
    replies: int = 0
    disconnects: int = 0
    fds_sent: int = 0
    dead_handles_sent: int = 0
    good_ops: int = 0
    good_errors: list[str] = field(default_factory=list)
    exporter: fuzz_exporter.ExporterReport = field(default_factory=fuzz_exporter.ExporterReport)
    broker_fds: tuple[int, int] = (0, 0)
    broker_rss_kib: tuple[int, int] = (0, 0)
    seconds: float = 0.0


def _random_fds(
    rng: random.Random, pool: list[int], lock: threading.Lock, dead: list[int]
) -> tuple[list[int], int]:
    """Fresh descriptors of every kind (the caller closes them), plus copies of live handles and
    of dead ones; and how many of them are dead handles.

    ``pool`` belongs to the good client's thread, which closes its entries: copy them under
    ``lock``, or a number closed and reused in between would be duplicated by mistake.
    ``dead`` stays as it is until every fuzz client is done.
    """
    made: list[int] = []
    deaths = 0
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 17, 40])):
        kind = rng.randrange(9)
        if kind == 0:
            r, w = os.pipe()
            made += [r, w]
        elif kind == 1:
            a, b = socket.socketpair(socket.AF_UNIX, rng.choice([socket.SOCK_STREAM, socket.SOCK_SEQPACKET]))
            made += [a.detach(), b.detach()]
        elif kind == 2:
            made.append(os.open(__file__, os.O_RDONLY))
        elif kind == 3:
            made.append(os.open("/dev/null", os.O_RDWR))
        elif kind in (4, 5):
            fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, rng.choice([0, 4096, 4097, 65536]))
            if kind == 5:
                fcntl.fcntl(
                    fd, fcntl.F_ADD_SEALS, rng.choice([fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_WRITE, 0x10 | 1])
                )
            made.append(fd)
        elif kind == 6:
            if dead and rng.random() < 0.5:
                made.append(os.dup(rng.choice(dead)))  # minted by a broker that is gone
            else:
                end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                peer.close()  # what a dead handle is, to the kernel
                made.append(end.detach())
            deaths += 1
        else:
            with lock:
                if pool:
                    made.append(os.dup(rng.choice(pool)))  # a live handle
    return made, deaths


def dead_handles(count: int) -> list[int]:
    """``count`` handles, read-write and read-only, of buffers of a broker that has stopped.

    Each was a real handle, of a buffer that was written and mapped; its broker's end closed
    when that broker exited, so no broker knows it now.
    """
    handles: list[int] = []
    with own_broker() as minting, bufbroker.connect("dead-maker", socket=minting.socket) as dev:
        for i in range(count):
            buf = dev.allocate(4096 * (i + 1), name=f"dead-{i}")
            with buf.cpu_access(Access.WRITE) as mem:
                mem[:4] = b"dead"
            handles.append(buf.share(readonly=bool(i % 2)))
    return handles


def _check_dead_handles(target: Target, dead: list[int], report: Report) -> None:
    """No dead handle imports: each is refused with EINVAL, as any descriptor that is no handle."""
    with bufbroker.connect("dead-check", socket=target.socket) as dev:
        for fd in dead:
            try:
                buf = dev.import_handle(fd)
            except bufbroker.BrokerError as e:
                if e.errno != errno.EINVAL:
                    report.good_errors.append(f"a dead handle was refused with {e.code}, not EINVAL")
            else:
                report.good_errors.append(f"a dead handle imported buffer {buf.id}")
                buf.close()


def _packb(value: object) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


def _frame(rng: random.Random, valid: bytes) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if choice == 1:  # a mutated valid request
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data[: rng.randrange(1, len(data) + 1)])
    args = {rng.choice(KEYS): rng.choice(VALUES) for _ in range(rng.randrange(0, 4))}
    if choice == 2:
        return _packb(
            [rng.choice([0, 0, 0, 1, 2, 3, 7]), rng.choice([0, 1, 99, -1, "x"]), rng.choice(OPS), args]
        )
    if choice == 3:
        return _packb([0, rng.randrange(1 << 20), rng.choice(OPS), args])
    if choice == 4:
        return _packb(rng.choice(VALUES))
    return _packb([0, 1, "ping", {"pad": "x" * rng.choice([10, 70_000, 300_000])}])[:212_000]


def _drain(sock: socket.socket, report: Report, lock: threading.Lock, wait: float) -> bool:
    """Read every answer waiting (for up to ``wait`` s for the first); True if the broker hung up."""
    ready, _, _ = select.select([sock], [], [], wait)
    while ready:
        try:
            data, ancdata, _, _ = sock.recvmsg(1 << 18, socket.CMSG_SPACE(64))
        except BlockingIOError:
            return False
        except OSError:
            return True
        protocol.close_all(protocol.fds_from_ancillary(ancdata, 0, 16))
        if not data:
            return True
        with lock:
            report.replies += 1
    return False


def _fuzz_client(
    target: Target,
    frames: int,
    seed: int,
    pool: list[int],
    dead: list[int],
    report: Report,
    lock: threading.Lock,
) -> None:
    rng = random.Random(seed)
    valid = msgpack.packb([0, 5, "map", {"attachment": 1, "direction": "to_device"}])
    sock: socket.socket | None = None
    for _ in range(frames):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect(target.socket)
            sock.setblocking(False)
            if rng.random() < 0.9:
                sock.send(msgpack.packb([0, 0, "hello", {"version": 1, "name": "fuzz"}]))
        fds, deaths = _random_fds(rng, pool, lock, dead)
        frame = _frame(rng, valid)
        sent = gone = False
        try:
            while not sent and not gone:
                try:
                    sock.sendmsg([frame], protocol.ancillary(fds))
                    sent = True
                except BlockingIOError:  # the broker pushes back: read its answers, then retry
                    gone = _drain(sock, report, lock, wait=0.05)
                except OSError:
                    gone = True  # too large for a packet, or the broker hung up
        finally:
            protocol.close_all(fds)
        if not gone:
            gone = _drain(sock, report, lock, wait=0)
        with lock:
            report.frames += 1
            report.fds_sent += len(fds) * sent
            report.dead_handles_sent += deaths * sent
            report.disconnects += gone
        if gone:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def _good_client(
    target: Target, stop: threading.Event, report: Report, pool: list[int], lock: threading.Lock
) -> None:
    """Real work that must never fail while the fuzzers run."""
    try:
        with (
            bufbroker.connect("good", socket=target.socket) as dev,
            bufbroker.connect("good-peer", socket=target.socket) as peer,
        ):
            n = 0
            timeline = dev.timeline(name="good")
            handle = timeline.share()
            waiter = peer.import_timeline(handle)
            with lock:
                pool.append(handle)  # a live timeline handle, for the fuzzers to send
            while not stop.is_set():
                buf = dev.allocate(8192, name=f"good-{n}")
                fence = timeline.fence(n + 1)  # the write is promised, then done, then signalled
                buf.attach_fence(fence, Access.WRITE)
                with buf.attach() as att, att.map(Direction.FROM_DEVICE) as m:
                    m.memory[:8] = n.to_bytes(8, "little")
                handle = buf.share()
                with lock:
                    pool.append(os.dup(handle))
                    pool.append(os.dup(fence.fileno()))
                    while len(pool) > 8:
                        os.close(pool.pop(0))
                theirs = peer.import_handle(handle)
                os.close(handle)
                timeline.signal(n + 1)
                waiter.wait(n + 1, timeout=5)
                with theirs.cpu_access(Access.READ, timeout=5) as mem:  # waits on the reservation
                    if int.from_bytes(mem[:8], "little") != n:
                        raise AssertionError("the good client read back the wrong bytes")
                fence.close()
                theirs.close()
                buf.close()
                n += 1
                with lock:
                    report.good_ops += 1
    except Exception as e:  # reported, not raised: the caller asserts on it
        report.good_errors.append(repr(e))


def run(target: Target, *, frames: int, clients: int = 4, seed: int = 1, dead: int = 4) -> Report:
    report = Report()
    lock = threading.Lock()
    pool: list[int] = []
    dead_pool = dead_handles(dead)
    fds0, rss0 = target.fds(), target.rss_kib()
    stop = threading.Event()
    started = time.monotonic()
    good = threading.Thread(target=_good_client, args=(target, stop, report, pool, lock))
    good.start()
    rng = random.Random(seed)
    stop_exporter, report.exporter = fuzz_exporter.start(
        target.socket, seed, lambda: _random_fds(rng, pool, lock, dead_pool)[0]
    )
    fuzzers = [
        threading.Thread(
            target=_fuzz_client,
            args=(target, frames // clients, seed * 1000 + i, pool, dead_pool, report, lock),
        )
        for i in range(clients)
    ]
    for t in fuzzers:
        t.start()
    for t in fuzzers:
        t.join()
    stop.set()
    good.join()
    # A short run on a loaded machine may end before the fuzzed exporter's importer has mapped
    # anything: give it a bounded while, so that the run always checks some of its bytes.
    deadline = time.monotonic() + 20
    while report.exporter.maps == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_exporter()
    report.good_errors += report.exporter.errors
    protocol.close_all(pool)
    try:
        _check_dead_handles(target, dead_pool, report)
    finally:
        protocol.close_all(dead_pool)
    report.seconds = time.monotonic() - started
    report.broker_fds = (fds0, target.settle(fds0))
    report.broker_rss_kib = (rss0, target.rss_kib())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz")
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dead-handles", type=int, default=4, help="handles minted by a broker that is gone")
    args = parser.parse_args()
    with own_broker("--exporter-call-timeout", "0.3") as target:
        report = run(target, frames=args.frames, clients=args.clients, seed=args.seed, dead=args.dead_handles)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
