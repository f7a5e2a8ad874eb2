"""P6: frames through a stream, against a bare shared ring with an eventfd and against iceoryx2.

One-way latency of a 1 MiB frame: the publisher stamps CLOCK_MONOTONIC into the frame and
sends it; the subscriber process reads its first and last page and reports the time since
the stamp, then waits for the next. Each case has its own subscriber process, and the cases
take turns frame by frame (interleaved). The floor is the least any shared-memory pipeline
can do in Python: a ring in a memfd, the latest frame's number in its header, an eventfd write
to wake the reader. iceoryx2 runs in event mode (a listener woken by a notifier, as its
event-based examples do). Then frames per second, the publisher sending as fast as the slowest
subscriber gives slots back, with 1 and 4 subscribers, bufbroker against iceoryx2 with
backpressure (no frame dropped on either side).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import bufbroker

from ._harness import Row, Settings, against, broker, interleave, spawn, summarize

SIZE = 1 << 20
SLOTS = 4
PAGE = mmap.PAGESIZE
GROUP = "stream"
_WORKERS = "benchmarks._stream_workers"


def _stamp(frame: Any) -> None:
    frame[:8] = time.monotonic_ns().to_bytes(8, "little")


def _took(ctl: socket.socket) -> float:
    return int.from_bytes(ctl.recv(8, socket.MSG_WAITALL), "little") / 1000


@contextlib.contextmanager
def _subscriber(role: str, *args: str, pass_fds: tuple[int, ...] = ()) -> Iterator[socket.socket]:
    ours, theirs = socket.socketpair()
    fds = (theirs.fileno(), *pass_fds)
    with ours, spawn(role, str(theirs.fileno()), *args, pass_fds=fds, module=_WORKERS):
        theirs.close()
        ours.settimeout(30)
        assert ours.recv(5, socket.MSG_WAITALL) == b"ready"
        yield ours


def _stream_case(pub: bufbroker.Publisher, ctl: socket.socket) -> Callable[[], float]:
    def one() -> float:
        with pub.loan(timeout=10) as frame:
            _stamp(frame.memory)
            frame.send(SIZE)
        return _took(ctl)

    return one


class _Ring:
    """The floor: a ring in a memfd, the latest frame's number in its header, an eventfd."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("bench-ring")
        os.ftruncate(self.memfd, PAGE + SLOTS * SIZE)
        self.eventfd = os.eventfd(0)
        self._map = mmap.mmap(self.memfd, PAGE + SLOTS * SIZE)
        self._view = memoryview(self._map)
        self._header = self._view[:8].cast("Q")
        self.seq = 0

    def send(self) -> None:
        self.seq += 1
        slot = (self.seq - 1) % SLOTS
        _stamp(self._view[PAGE + slot * SIZE : PAGE + slot * SIZE + 8])
        self._header[0] = self.seq
        os.eventfd_write(self.eventfd, 1)

    def close(self) -> None:
        self._header.release()
        self._view.release()
        self._map.close()
        os.close(self.memfd)
        os.close(self.eventfd)


class _Iceoryx2:
    """An iceoryx2 publisher of 1 MiB slices and a notifier, on a service of our own."""

    def __init__(self, name: str, *, backpressure: bool = False) -> None:
        import iceoryx2 as iox2

        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        self.service = name
        self._node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        service_name = iox2.ServiceName.new(name)
        builder = self._node.service_builder(service_name).publish_subscribe(iox2.Slice[ctypes.c_uint8])
        if backpressure:
            builder = builder.enable_safe_overflow(False).subscriber_max_buffer_size(SLOTS).max_subscribers(8)
        self._pubsub = builder.create()
        publisher = self._pubsub.publisher_builder().initial_max_slice_len(SIZE)
        if backpressure:
            publisher = publisher.backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        self._publisher = publisher.create()
        self._event = self._node.service_builder(service_name).event().open_or_create()
        self._notifier = self._event.notifier_builder().create()

    def send(self) -> None:
        sample = self._publisher.loan_slice_uninit(SIZE)
        _stamp(sample.payload().as_memory_view().cast("B"))
        sample.assume_init().send()
        self._notifier.notify()

    def case(self, ctl: socket.socket) -> Callable[[], float]:
        def one() -> float:
            self.send()
            return _took(ctl)

        return one


def _iceoryx2_missing() -> str | None:
    try:
        import iceoryx2  # noqa: F401
    except ImportError as e:
        return f"iceoryx2 is not installed ({e}): pip install -e '.[bench]'"
    return None


def run(settings: Settings) -> list[Row]:
    rounds, warmup = settings.n(400, 20), settings.n(40, 5)
    missing = _iceoryx2_missing()
    rows: list[Row] = []
    with broker() as b, contextlib.ExitStack() as stack:
        dev = stack.enter_context(bufbroker.connect("bench-publisher", socket=b.socket))
        blocking = stack.enter_context(dev.publish("p6", size=SIZE, slots=SLOTS))
        in_trio = stack.enter_context(dev.publish("p6-trio", size=SIZE, slots=SLOTS))
        ring, ring_for_trio = _Ring(), _Ring()
        stack.callback(ring.close)
        stack.callback(ring_for_trio.close)
        cases: dict[str, Callable[[], float]] = {
            "stream": _stream_case(blocking, stack.enter_context(_subscriber("stream", b.socket, "p6"))),
            "stream, trio subscriber": _stream_case(
                in_trio, stack.enter_context(_subscriber("stream-trio", b.socket, "p6-trio"))
            ),
        }
        fds = (ring.memfd, ring.eventfd)
        ring_ctl = stack.enter_context(_subscriber("ring", *map(str, (*fds, SLOTS, SIZE)), pass_fds=fds))

        def floor() -> float:
            ring.send()
            return _took(ring_ctl)

        cases["bare ring + eventfd"] = floor
        fds = (ring_for_trio.memfd, ring_for_trio.eventfd)
        trio_ctl = stack.enter_context(_subscriber("ring-trio", *map(str, (*fds, SLOTS, SIZE)), pass_fds=fds))

        def trio_floor() -> float:
            ring_for_trio.send()
            return _took(trio_ctl)

        cases["bare ring + eventfd, trio"] = trio_floor
        if missing is None:
            iox = _Iceoryx2(f"bufbroker-bench-{os.getpid()}")
            cases["iceoryx2, event"] = iox.case(stack.enter_context(_subscriber("iceoryx2", iox.service)))
        samples = interleave(cases, rounds, warmup)
        found = {name: summarize(GROUP, name, "1 MiB, one way", s) for name, s in samples.items()}
        base = found["bare ring + eventfd"]
        rows.append(base)
        for name in ("stream", "stream, trio subscriber"):
            rows.append(against(found[name], base))
            rows[-1].note = "target: at most 1.5 times"
        rows.append(against(found["bare ring + eventfd, trio"], base))
        rows[-1].note = "what trio's wake-up costs on its own"
        trio_case = "stream, trio subscriber"
        again = summarize(GROUP, trio_case, "1 MiB, one way", samples[trio_case])
        rows.append(against(again, found["bare ring + eventfd, trio"]))
        if missing is None:
            rows.append(found["iceoryx2, event"])
            for name in ("stream", "stream, trio subscriber"):
                mine = summarize(GROUP, name, "1 MiB, one way", samples[name])
                rows.append(against(mine, found["iceoryx2, event"]))
                rows[-1].note = "target: below 1 (faster)"
        else:
            rows[-1].note += f"; {missing}"
    rows += _throughput(settings, missing)
    return rows


def _throughput(settings: Settings, missing: str | None) -> list[Row]:
    frames, rounds = settings.n(2000, 50), settings.n(3, 1)
    rows: list[Row] = []
    for subscribers in (1, 4):
        param = f"1 MiB, {subscribers} subscriber{'s' if subscribers > 1 else ''}"
        with broker() as b, contextlib.ExitStack() as stack:
            dev = stack.enter_context(bufbroker.connect("bench-publisher", socket=b.socket))
            pub = stack.enter_context(dev.publish("fps", size=SIZE, slots=SLOTS))
            ours = [stack.enter_context(_subscriber("stream", b.socket, "fps")) for _ in range(subscribers)]

            cases = {"stream": _rate(_sender(pub), ours, frames)}
            if missing is None:
                iox = _Iceoryx2(f"bufbroker-fps-{os.getpid()}-{subscribers}", backpressure=True)
                theirs = [stack.enter_context(_subscriber("iceoryx2", iox.service)) for _ in ours]
                cases["iceoryx2, event"] = _rate(iox.send, theirs, frames)
            samples = interleave(cases, rounds, 1)
        found = {n: summarize(GROUP, n, param, s, unit="frames/s") for n, s in samples.items()}
        if missing is None:
            rows.append(found["iceoryx2, event"])
            rows.append(against(found["stream"], found["iceoryx2, event"], higher_is_better=True))
            rows[-1].note = "ratio below 1: more frames per second"
        else:
            rows.append(found["stream"])
    return rows


def _sender(pub: bufbroker.Publisher) -> Callable[[], None]:
    def send() -> None:
        with pub.loan(timeout=10) as frame:
            _stamp(frame.memory)
            frame.send(SIZE)

    return send


def _rate(send: Callable[[], None], ctls: list[socket.socket], frames: int) -> Callable[[], float]:
    """Frames per second: ``frames`` sent back to back, until every subscriber has them all."""

    def one() -> float:
        got = [0] * len(ctls)  # bytes of answers (8 a frame) from each subscriber

        def drain(i: int, flags: int) -> None:
            with contextlib.suppress(BlockingIOError):
                got[i] += len(ctls[i].recv(8 * 1024, flags))

        began = time.perf_counter()
        for _ in range(frames):
            send()
            for i in range(len(ctls)):  # take what has arrived, so that no socket fills up
                drain(i, socket.MSG_DONTWAIT)
        for i in range(len(ctls)):
            while got[i] < 8 * frames:
                drain(i, 0)
        return frames / (time.perf_counter() - began)

    return one


if __name__ == "__main__":
    sys.exit("run: python -m benchmarks --only streams")
