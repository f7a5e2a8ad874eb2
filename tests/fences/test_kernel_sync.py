"""Ports of the kernel's selftests/sync (sync_fence, sync_merge, sync_wait, sync_stress_*).

The kernel's sw_sync lets anyone make a fence for any point; here only a timeline's signaller
makes fences for points not yet reached (anyone may for reached ones), so where the originals
have another thread make a future fence, the port has that process wait on the timeline point
itself (drm_syncobj's wait), which needs no fence. Threads become processes.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Fence

from conftest import Broker, Peer
from fence_fixtures import channel, fence_peer

__all__ = ["channel", "fence_peer"]


def _count(fence: Fence, status: int) -> int:
    """sync_fence_count_with_status: how many of the fence's points have ``status``."""
    return sum(
        1 for point in fence.info() if (point["status"] < 0 if status < 0 else point["status"] == status)
    )


def _etime(call: Callable[[], object]) -> None:
    with pytest.raises(bufbroker.BrokerError) as e:
        call()
    assert e.value.errno == errno.ETIME


def test_fence_one_timeline_wait(broker: Broker) -> None:
    """sync_fence.c test_fence_one_timeline_wait, the fence waited on by another device."""
    with broker.connect("signaller") as dev, broker.connect("waiter") as other:
        tl = dev.timeline()
        made = tl.fence(5)
        fd = made.share()
        fence = other.import_fence(fd)
        os.close(fd)
        _etime(lambda: fence.wait(timeout=0))
        tl.signal(1)
        _etime(lambda: fence.wait(timeout=0))
        assert fence.status == 0
        tl.signal(2)
        tl.signal(5)
        fence.wait(timeout=0)
        tl.signal(10)  # past the point: still signalled
        fence.wait(timeout=0)
        assert fence.status == 1 and made.status == 1


def test_fence_one_timeline_merge(broker: Broker) -> None:
    """sync_fence.c test_fence_one_timeline_merge: a merge keeps one point per timeline."""
    with broker.connect() as dev:
        tl = dev.timeline()
        a, b, c = tl.fence(1), tl.fence(2), tl.fence(3)
        d = dev.merge_fences(dev.merge_fences(a, b), c)
        assert [p["point"] for p in d.info()] == [3]
        assert _count(d, 0) == 1
        tl.signal(1)
        assert a.status == 1 and _count(d, 0) == 1
        tl.signal(2)
        assert b.status == 1 and _count(d, 0) == 1
        tl.signal(3)
        assert c.status == 1 and _count(d, 1) == 1
        d.wait(timeout=0)


def test_merge_same_fence(broker: Broker) -> None:
    """sync_merge.c test_merge_same_fence: a fence merged with itself."""
    with broker.connect() as dev:
        tl = dev.timeline()
        fence = tl.fence(5)
        merged = dev.merge_fences(fence, fence)
        assert merged.status == 0 and len(merged.info()) == 1
        tl.signal(5)
        assert merged.status == 1


def test_multi_timeline_wait(broker: Broker) -> None:
    """sync_wait.c test_fence_multi_timeline_wait: three timelines, one merged fence."""
    with broker.connect("signaller") as dev, broker.connect("waiter") as other:
        a, b, c = dev.timeline(), dev.timeline(), dev.timeline()
        merged = dev.merge_fences(dev.merge_fences(a.fence(5), b.fence(5)), c.fence(5))
        fd = merged.share()
        fence = other.import_fence(fd)
        os.close(fd)
        assert _count(fence, 0) == 3
        _etime(lambda: fence.wait(timeout=0))
        a.signal(5)
        assert (_count(fence, 0), _count(fence, 1)) == (2, 1)
        _etime(lambda: fence.wait(timeout=0))
        b.signal(5)
        assert (_count(fence, 0), _count(fence, 1)) == (1, 2)
        c.signal(5)
        assert (_count(fence, 0), _count(fence, 1)) == (0, 3)
        fence.wait(timeout=0)


def test_stress_parallelism(broker: Broker, fence_peer: Callable[..., Peer], channel) -> None:  # type: ignore[no-untyped-def]
    """sync_stress_parallelism: two processes take turns, each checking the shared counter."""
    ours, theirs = channel()
    a = fence_peer("parallel", broker.socket, theirs.fileno(), 0, 300, pass_fds=(theirs.fileno(),))
    ours2, theirs2 = channel()
    b = fence_peer("parallel", broker.socket, theirs2.fileno(), 1, 300, pass_fds=(theirs2.fileno(),))
    with broker.connect("counter") as dev:
        counter = dev.allocate(4096)
        for sock in (ours, ours2):
            handle = counter.share()
            bufbroker.send_handle(sock, handle)
            os.close(handle)
        # Each process sends its timeline; each gets the other's.
        ta, tb = bufbroker.recv_handle(ours), bufbroker.recv_handle(ours2)
        bufbroker.send_handle(ours, tb)
        bufbroker.send_handle(ours2, ta)
        os.close(ta)
        os.close(tb)
        assert a.line() and b.line()
        assert a.finish() == 0 and b.finish() == 0
        with counter.cpu_access(bufbroker.Access.READ) as mem:
            assert int.from_bytes(mem[:8], "little") == 600


def test_stress_consumer(broker: Broker, fence_peer: Callable[..., Peer], channel) -> None:  # type: ignore[no-untyped-def]
    """sync_stress_consumer: producers wait for the consumer, the consumer for all producers."""
    producers, iterations = 3, 150
    with broker.connect("consumer") as dev:
        counters = dev.allocate(4096)
        consumer = dev.timeline(name="consumer")
        peers, theirs_tls = [], []
        for k in range(producers):
            ours, theirs = channel()
            peers.append(
                fence_peer(
                    "producer", broker.socket, theirs.fileno(), k, iterations, pass_fds=(theirs.fileno(),)
                )
            )
            for handle in (counters.share(), consumer.share()):
                bufbroker.send_handle(ours, handle)
                os.close(handle)
            handle = bufbroker.recv_handle(ours)
            theirs_tls.append(dev.import_timeline(handle))
            os.close(handle)
        with counters.attach() as att, att.map() as m:
            for it in range(1, iterations + 1):
                # The original merges one fence per producer; future fences are the
                # producers' own to make, so the consumer waits on each point instead.
                for tl in theirs_tls:
                    tl.wait(it, timeout=10)
                total = sum(int.from_bytes(m.memory[8 * k : 8 * k + 8], "little") for k in range(producers))
                assert total == producers * it
                consumer.signal(it)
        for p in peers:
            assert p.finish() == 0


def test_stress_merge(broker_factory: Callable[..., Broker]) -> None:
    """sync_stress_merge: random merges over many timelines, signalled point by point."""
    broker = broker_factory("--max-fence-time", "120")
    rng = random.Random(1)
    with broker.connect() as dev:
        timelines = [dev.timeline() for _ in range(bufbroker.protocol.MAX_FENCE_TIMELINES)]
        fence = timelines[0].fence(0)  # point 0: signalled already
        highest = {timelines[0].id: 0}
        for _ in range(300):
            tl = rng.choice(timelines)
            point = rng.randrange(1, 1024)
            part = tl.fence(point)
            merged = dev.merge_fences(part, fence)
            part.close()
            fence.close()
            fence = merged
            highest[tl.id] = max(highest.get(tl.id, 0), point)
        assert {p["timeline"]: p["point"] for p in fence.info()} == highest
        assert fence.status == 0
        for i, tl in enumerate(timelines):
            top = highest.get(tl.id, 0)
            for value in range(1, top):
                tl.signal(value)
            assert fence.status == 0 or top == 0
            if top:
                tl.signal(top)
            last = all(highest.get(t.id, 0) == 0 for t in timelines[i + 1 :])
            assert fence.status == (1 if last else 0)
        fence.wait(timeout=0)
