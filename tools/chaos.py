"""Chaos: workers run random sequences of real operations and are killed with SIGKILL at random
points; afterwards nothing of theirs is left in the broker, and a buffer they all shared with a
survivor is intact, byte for byte. Each worker signals a timeline of its own, makes fences and
puts them in its buffers' reservations; the survivor waits on every victim's timeline as it is
killed, and each of those waits must end with the timeline's error (ESRCH, or ETIMEDOUT if a
promise lapsed first), not with its own timeout. Workers also publish streams and subscribe to
the survivor's, holding its frames when they die: the survivor's own subscriber still receives
every frame, in order, and its publisher is never refused a slot.

    python -m tools.chaos --kills 100 [--workers 4] [--seed N]
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bufbroker
from bufbroker import Access, Direction

from ._common import Target, own_broker


@dataclass
class Report:
    kills: int = 0
    worker_ops: int = 0
    leftovers: int = 0
    survivor_intact: bool = False
    broker_fds: tuple[int, int] = (0, 0)
    broker_rss_kib: tuple[int, int] = (0, 0)
    usage_after: dict[str, int] | None = None
    waits_ended: int = 0  # survivor waits on a victim's timeline that ended with its error
    waits_wrong: list[str] = field(default_factory=list)
    stream_frames: int = 0  # frames the survivor's subscriber received
    stream_intact: bool = False  # every one, in order, with its bytes, and no loan refused
    seconds: float = 0.0

STREAM = "chaos-survivor"


def worker(path: str, fd: str, seed: str) -> None:
    """Random real operations until killed; the shared buffer arrives read-only on ``fd``."""
    rng = random.Random(int(seed))
    sock = socket.socket(fileno=int(fd))
    handle = bufbroker.recv_handle(sock)
    dev = bufbroker.connect(f"chaos-{os.getpid()}", socket=path)
    shared = dev.import_handle(handle)
    timeline = dev.timeline(name="chaos")
    handle = timeline.share()
    bufbroker.send_handle(sock, handle)
    os.close(handle)
    mine: list[bufbroker.Buffer] = []
    open_things: list[object] = []
    ops = 0
    while True:
        ops += 1
        if ops % 50 == 0:
            print(ops, flush=True)
        action = rng.randrange(12)
        try:
            if action == 0 or not mine:
                mine.append(dev.allocate(rng.choice([4096, 65536, 1 << 20])))
            elif action == 1:
                att = rng.choice([*mine, shared]).attach()
                open_things.append(att.map(Direction.TO_DEVICE))
                open_things.append(att)
            elif action == 2:
                access = rng.choice(mine).cpu_access(Access.WRITE, timeout=0.01)  # own promises: ETIME
                access.begin()[:4] = b"junk"
                open_things.append(access)
            elif action == 3:
                with shared.cpu_access(Access.READ) as mem:
                    bytes(mem[:16])
            elif action == 4:
                fd2 = rng.choice(mine).share(readonly=rng.random() < 0.5)
                open_things.append(fd2)
            elif action == 5 and len(mine) > 3:
                b = mine.pop(0)
                b.close()
            elif action == 6:
                dev.ping()
            elif action == 7:  # keep the promises made (else max_fence_time fails the timeline)
                timeline.signal(max(timeline.value + rng.randrange(1, 3), timeline.promised))
            elif action == 8:  # a promise, in one of its buffers' reservation
                fence = timeline.fence(timeline.value + rng.randrange(1, 5))
                rng.choice(mine).attach_fence(fence, rng.choice([Access.READ, Access.WRITE]))
                open_things.append(fence)
            elif action == 9:
                fence = rng.choice(mine).export_fence(Access.RW)
                fence.wait(timeout=rng.choice([0, 0.001]))
            elif action == 10:  # subscribe to the survivor's stream and keep what arrives
                sub = dev.subscribe(STREAM)
                open_things.append(sub)
                if rng.random() < 0.5:
                    open_things.append(sub.receive(timeout=0.2))
            elif action == 11:  # a stream of one's own, subscribed to by oneself
                pub = dev.publish(f"chaos-{os.getpid()}-{ops}", size=rng.choice([100, 70_000]), slots=2)
                open_things.append(pub)
                open_things.append(dev.subscribe(pub.name))
                with pub.loan(timeout=0.2) as frame:
                    frame.send(1)
        except bufbroker.BrokerError:
            pass  # EBUSY and friends: the sequence is random; the broker's answer is what counts


def run(target: Target, *, kills: int, workers: int = 3, seed: int = 1) -> Report:
    rng = random.Random(seed)
    report = Report()
    started = time.monotonic()
    with bufbroker.connect("survivor", socket=target.socket) as dev:
        shared = dev.allocate(1 << 20, name="survivor")
        with shared.cpu_access(Access.WRITE) as mem:
            mem[:] = rng.randbytes(1 << 20)
            digest = hashlib.sha256(mem).hexdigest()
        fds0, rss0 = target.fds(), target.rss_kib()
        usage0 = dev.stats()["usage"]
        running: list[subprocess.Popen[str]] = []
        timelines: dict[int, int] = {}  # worker pid -> handle to its timeline
        stop = threading.Event()
        survivor = _SurvivorStream(target.socket, stop)

        def start() -> subprocess.Popen[str]:
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tools.chaos",
                    "--worker",
                    target.socket,
                    str(theirs.fileno()),
                    str(rng.randrange(1 << 30)),
                ],
                pass_fds=[theirs.fileno()],
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).parent.parent,
            )
            theirs.close()
            handle = shared.share(readonly=True)
            bufbroker.send_handle(ours, handle)
            os.close(handle)
            timelines[proc.pid] = bufbroker.recv_handle(ours)
            ours.close()
            return proc

        def wait_on(victim: int) -> tuple[threading.Thread, bufbroker.Timeline]:
            """Wait on the victim's timeline, far ahead: only its death can end this wait."""
            handle = timelines.pop(victim)
            waiter = dev.import_timeline(handle)
            os.close(handle)

            def wait() -> None:
                try:
                    waiter.wait(1 << 62, timeout=10)
                    report.waits_wrong.append("a wait for a point never signalled returned")
                except bufbroker.BrokerError as e:
                    if e.errno in (errno.ESRCH, errno.ETIMEDOUT):  # its death, or an unkept promise
                        report.waits_ended += 1
                    else:
                        report.waits_wrong.append(f"a wait ended with {e.code}, not ESRCH")

            thread = threading.Thread(target=wait)
            thread.start()
            return thread, waiter

        running = [start() for _ in range(workers)]
        try:
            while report.kills < kills:
                victim = running.pop(rng.randrange(len(running)))
                assert victim.stdout is not None
                for _ in range(rng.randrange(1, 4)):  # let it get somewhere first
                    line = victim.stdout.readline()
                    if not line:
                        break
                    report.worker_ops = max(report.worker_ops, int(line))
                waiting, waiter = wait_on(victim.pid)
                time.sleep(rng.random() * 0.02)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                victim.stdout.close()
                waiting.join()
                waiter.close()
                report.kills += 1
                running.append(start())
        finally:
            for proc in running:
                proc.kill()
                proc.wait()
                if proc.stdout:
                    proc.stdout.close()
            for handle in timelines.values():
                os.close(handle)
            stop.set()
            report.stream_frames, report.stream_intact = survivor.join()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            leftovers = [d for d in dev.devices() if str(d["name"]).startswith("chaos-")]
            buffers = [b for b in dev.buffers() if b["id"] != shared.id]
            lines = dev.timelines()
            leftovers += dev.streams()
            if not leftovers and not buffers and not lines:
                break
            time.sleep(0.05)
        report.leftovers = len(leftovers) + len(buffers) + len(lines)
        [entry] = [b for b in dev.buffers() if b["id"] == shared.id]
        report.leftovers += len(entry["attachments"]) + len(entry["cpu_access"]) + entry["handles"] - 1
        with shared.cpu_access(Access.READ) as mem:
            report.survivor_intact = hashlib.sha256(mem).hexdigest() == digest
        report.usage_after = dev.stats()["usage"]
        report.leftovers += int(report.usage_after != usage0)
        report.broker_fds = (fds0, target.settle(fds0))
        report.broker_rss_kib = (rss0, target.rss_kib())
    report.seconds = time.monotonic() - started
    return report


class _SurvivorStream:
    """A stream published and read by the survivor in threads of its own while workers die."""

    def __init__(self, path: str, stop: threading.Event) -> None:
        self._stop = stop
        self._publisher = bufbroker.connect("survivor-publisher", socket=path)
        self._pub = self._publisher.publish(STREAM, size=4096, slots=4)
        self._subscriber = bufbroker.connect("survivor-subscriber", socket=path)
        self._sub = self._subscriber.subscribe(STREAM)
        self.sent = self.received = 0
        self.intact = True
        self._threads = [threading.Thread(target=self._send), threading.Thread(target=self._receive)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        while not self._stop.is_set():
            try:
                with self._pub.loan(timeout=5) as frame:  # a dead worker's frames come back at once
                    frame.memory[:8] = frame.seq.to_bytes(8, "little")
                    frame.send(8)
                    self.sent = frame.seq
            except bufbroker.BrokerError:
                self.intact = False
                return
            time.sleep(0.001)
        self._pub.close()

    def _receive(self) -> None:
        try:
            for frame in self._sub:
                if frame.seq != self.received + 1 or bytes(frame.memory) != frame.seq.to_bytes(8, "little"):
                    self.intact = False
                self.received = frame.seq
        except bufbroker.BrokerError:
            self.intact = False

    def join(self) -> tuple[int, bool]:
        for thread in self._threads:
            thread.join()
        self._sub.close()
        self._publisher.close()
        self._subscriber.close()
        return self.received, self.intact and self.received == self.sent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.chaos")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker", nargs=3, metavar=("SOCKET", "FD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with own_broker() as target:
        report = run(target, kills=args.kills, workers=args.workers, seed=args.seed)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
