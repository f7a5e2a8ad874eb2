"""Timelines: the rules, and ports of IGT's syncobj_timeline and the kernel's st-dma-fence.

Signal and wait are stores and loads in a shared page plus an eventfd write; the broker only
makes timelines, hands them out, and fails them when their signaller ends or a promise lapses.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import time
from collections.abc import Callable

import pytest

import bufbroker

from conftest import Broker, Peer
from fence_fixtures import channel, fence_peer

__all__ = ["channel", "fence_peer"]


def _errno(call: Callable[[], object]) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call()
    assert e.value.errno is not None
    return e.value.errno


def _waiter_of(dev: bufbroker.Device, tl: bufbroker.Timeline) -> bufbroker.Timeline:
    fd = tl.share()
    try:
        return dev.import_timeline(fd)
    finally:
        os.close(fd)


def test_the_rules_and_their_errnos(broker: Broker) -> None:
    with broker.connect("signaller") as dev, broker.connect("waiter") as other:
        tl = dev.timeline(name="render-done")
        assert (tl.value, tl.error, tl.name, tl.signaller) == (0, 0, "render-done", True)
        waiter = _waiter_of(other, tl)
        assert not waiter.signaller
        tl.signal(2)
        assert _errno(lambda: tl.signal(2)) == errno.EINVAL  # points only go up
        assert _errno(lambda: tl.signal(1)) == errno.EINVAL
        assert _errno(lambda: waiter.signal(3)) == errno.EPERM  # one signaller
        assert _errno(lambda: waiter.fence(3)) == errno.EINVAL  # no future fences from others
        assert waiter.fence(2).status == 1  # a reached point: anyone may
        assert _errno(lambda: waiter.wait(3, timeout=0.01)) == errno.ETIME
        assert waiter.value == 2
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            assert _errno(lambda: other.import_timeline(null)) == errno.EINVAL
            assert _errno(lambda: other.import_fence(null)) == errno.EINVAL
        finally:
            os.close(null)


def test_a_waiters_page_is_read_only(broker: Broker) -> None:
    """The kernel refuses another holder's writes: its page is mapped read-only."""
    with broker.connect() as dev, broker.connect() as other:
        waiter = _waiter_of(other, dev.timeline())
        with pytest.raises(TypeError):
            waiter._view.slots[1] = 99


def test_host_signal_ordered(broker: Broker) -> None:
    """syncobj_timeline host-signal-ordered: points signalled in order from the host wake in order."""
    with broker.connect() as dev, broker.connect() as other:
        tl = dev.timeline()
        waiter = _waiter_of(other, tl)
        for point in range(1, 65):
            assert waiter.status(point) == 0
            tl.signal(point)
            waiter.wait(point, timeout=0)
            assert waiter.status(point + 1) == 0 and waiter.value == point


def test_32bits_limit(broker: Broker) -> None:
    """syncobj_timeline 32bits-limit: points past 2**32 behave like the others."""
    with broker.connect() as dev, broker.connect() as other:
        tl = dev.timeline()
        waiter = _waiter_of(other, tl)
        base = 1 << 32
        fence = tl.fence(base + 2)
        tl.signal(base - 1)
        tl.signal(base + 1)
        assert fence.status == 0 and waiter.status(base + 1) == 1 and waiter.status(base + 2) == 0
        tl.signal(base + 2)
        fence.wait(timeout=0)
        tl.signal((1 << 63) - 1)
        waiter.wait((1 << 63) - 1, timeout=0)


def test_wait_for_submit(broker: Broker, fence_peer: Callable[..., Peer], channel) -> None:  # type: ignore[no-untyped-def]
    """syncobj_timeline wait-for-submit: a wait for a point no fence exists for yet."""
    a, b = channel()
    signaller = fence_peer("signaller", broker.socket, b.fileno(), 1, pass_fds=(b.fileno(),))
    c, d = channel()
    waiter = fence_peer("waiter", broker.socket, d.fileno(), 3, 10, pass_fds=(d.fileno(),))
    handle = bufbroker.recv_handle(a)
    bufbroker.send_handle(c, handle)
    os.close(handle)
    assert signaller.line() and waiter.line()
    signaller.send("signal 1")
    signaller.line()
    signaller.send("signal 3")
    signaller.line()
    assert '"errno": 0' in waiter.line()
    signaller.send("end")
    assert signaller.finish() == 0 and waiter.finish() == 0


def test_error_status(broker: Broker) -> None:
    """st-dma-fence error: a point failed on purpose carries its errno; later points too."""
    with broker.connect() as dev, broker.connect() as other:
        tl = dev.timeline()
        waiter = _waiter_of(other, tl)
        before, failed, after = tl.fence(1), tl.fence(2), tl.fence(3)
        tl.signal(1)
        tl.signal(2, error=errno.EIO)
        assert (before.status, failed.status, after.status) == (1, -errno.EIO, -errno.EIO)
        assert tl.error == errno.EIO
        waiter.wait(1, timeout=0)
        assert _errno(lambda: waiter.wait(2, timeout=0)) == errno.EIO
        assert _errno(lambda: failed.wait(timeout=0)) == errno.EIO
        fine = dev.timeline()
        fine.signal(1)
        merged = dev.merge_fences(fine.fence(1), after)
        assert [p["status"] for p in merged.info()] == [1, -errno.EIO] and merged.status == -errno.EIO
        tl.signal(4)  # the error is sticky
        assert _errno(lambda: waiter.wait(4, timeout=0)) == errno.EIO


def test_zero_timeout_wait(broker: Broker) -> None:
    """st-dma-fence wait: a zero timeout answers at once, either way."""
    with broker.connect() as dev:
        tl = dev.timeline()
        fence = tl.fence(1)
        started = time.monotonic()
        assert _errno(lambda: fence.wait(timeout=0)) == errno.ETIME
        assert _errno(lambda: tl.wait(1, timeout=0)) == errno.ETIME
        assert time.monotonic() - started < 1
        tl.signal(1)
        fence.wait(timeout=0)
        tl.wait(1, timeout=0)


def test_a_fence_descriptor_turns_readable_once_signalled(broker: Broker) -> None:
    """Any event loop can poll a fence: readable once every point is (one byte, then end-of-file)."""
    with broker.connect() as dev:
        tl = dev.timeline()
        fence = tl.fence(1)
        poller = select.poll()
        poller.register(fence.fileno(), select.POLLIN)
        assert poller.poll(50) == []
        tl.signal(1)
        assert poller.poll(5000)
        assert os.read(fence.fileno(), 16) == b"\0"
        assert poller.poll(5000)  # end-of-file follows the byte (a moment later, at most)
        assert os.read(fence.fileno(), 16) == b""
        assert poller.poll(0)  # and stays


def test_signaller_killed_wakes_every_waiter_with_esrch_within_100_ms(
    broker: Broker,
    fence_peer: Callable[..., Peer],
    channel,  # type: ignore[no-untyped-def]
) -> None:
    a, b = channel()
    signaller = fence_peer("signaller", broker.socket, b.fileno(), 3, pass_fds=(b.fileno(),))
    waiters = []
    for _ in range(3):
        c, d = channel()
        waiters.append(fence_peer("waiter", broker.socket, d.fileno(), 5, 30, pass_fds=(d.fileno(),)))
        handle = bufbroker.recv_handle(a)
        bufbroker.send_handle(c, handle)
        os.close(handle)
    assert signaller.line()
    for w in waiters:
        assert w.line()
    time.sleep(0.2)  # let them park in their waits
    killed = time.monotonic()
    signaller.proc.send_signal(signal.SIGKILL)
    for w in waiters:
        result = json.loads(w.line())
        assert result["errno"] == errno.ESRCH
        assert result["at"] - killed < 0.1, result["at"] - killed
    for w in waiters:
        assert w.finish() == 0


def test_an_unkept_promise_fails_with_etimedout(
    broker_factory: Callable[..., Broker],
    fence_peer: Callable[..., Peer],
    channel,  # type: ignore[no-untyped-def]
) -> None:
    broker = broker_factory("--max-fence-time", "0.3")
    a, b = channel()
    promiser = fence_peer("promiser", broker.socket, b.fileno(), 5, pass_fds=(b.fileno(),))
    c, d = channel()
    waiter = fence_peer("fence_waiter", broker.socket, d.fileno(), 30, pass_fds=(d.fileno(),))
    fence = bufbroker.recv_handle(a)
    bufbroker.send_handle(c, fence)
    os.close(fence)
    assert promiser.line() and json.loads(waiter.line())["status"] == 0
    started = time.monotonic()
    result = json.loads(waiter.line())
    assert result["errno"] == errno.ETIMEDOUT and result["status"] == -errno.ETIMEDOUT
    assert result["at"] - started < 5
    with broker.connect() as dev:
        [listed] = dev.timelines()
        assert listed["error"] == errno.ETIMEDOUT and listed["promised"] == 5
        assert listed["signaller"]["alive"]
    promiser.send("end")
    assert waiter.finish() == 0 and promiser.finish() == 0


def test_signal_and_wait_go_on_while_the_broker_is_stopped(
    broker: Broker,
    fence_peer: Callable[..., Peer],
    channel,  # type: ignore[no-untyped-def]
) -> None:
    a, b = channel()
    first = fence_peer("ping", broker.socket, a.fileno(), 500, 1, pass_fds=(a.fileno(),))
    second = fence_peer("ping", broker.socket, b.fileno(), 500, 0, pass_fds=(b.fileno(),))
    assert first.line() and second.line()
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        first.send("go")
        second.send("go")
        assert '"done": true' in first.line() and '"done": true' in second.line()
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    first.send("end")
    second.send("end")
    assert first.finish() == 0 and second.finish() == 0
