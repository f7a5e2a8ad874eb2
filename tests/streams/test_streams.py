"""Streams across real processes: frames in order, backpressure, departures, and no broker per frame."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

import bufbroker

from conftest import Broker, Peer
from stream_fixtures import said, stream_peer
from stream_peer import content

__all__ = ["stream_peer"]


def _errno(call: Callable[[], object]) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call()
    assert e.value.errno is not None
    return e.value.errno


def _send(pub: bufbroker.Publisher, marker: int | None = None) -> int:
    with pub.loan(timeout=5) as frame:
        data = content(frame.seq, pub.size) if marker is None else bytes([marker])
        frame.memory[: len(data)] = data
        frame.send(len(data))
        return frame.seq


def test_two_subscribers_get_every_frame_in_order_with_its_bytes(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    publisher = stream_peer("publish", broker.socket, "cam0", 70_000, 3, 300)
    assert said(publisher) == {"ready": True}
    subscribers = [stream_peer("subscribe", broker.socket, "cam0", 300) for _ in range(2)]
    assert [said(s) for s in subscribers] == [{"start": 1}, {"start": 1}]
    publisher.send("go")
    for s in subscribers:
        assert said(s) == {"seqs": list(range(1, 301)), "bad": 0}
    assert said(publisher) == {"sent": 300}
    for p in (publisher, *subscribers):
        p.send("end")
        assert p.finish() == 0


def test_frames_move_while_the_broker_is_stopped(broker: Broker, stream_peer: Callable[..., Peer]) -> None:
    publisher = stream_peer("publish", broker.socket, "cam0", 4096, 4, 500)
    assert said(publisher) == {"ready": True}
    subscriber = stream_peer("subscribe", broker.socket, "cam0", 500)
    assert said(subscriber) == {"start": 1}
    publisher.send("prime")
    assert said(publisher) == {"primed": 1}
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        publisher.send("go")
        assert said(subscriber) == {"seqs": list(range(1, 501)), "bad": 0}
        assert said(publisher) == {"sent": 500}
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    for p in (publisher, subscriber):
        p.send("end")
        assert p.finish() == 0


def test_backpressure_a_slot_comes_back_only_when_every_subscriber_gave_it_back(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    with broker.connect("publisher") as dev, dev.publish("cam0", size=100, slots=2) as pub:
        slow, fast = stream_peer("step", broker.socket, "cam0"), stream_peer("step", broker.socket, "cam0")
        assert said(slow) == said(fast) == {"start": 1}
        assert [_send(pub), _send(pub)] == [1, 2]
        assert _errno(lambda: pub.loan(timeout=0.05)) == errno.ETIME  # both hold frame 1's slot
        fast.send("next")
        assert said(fast)["seq"] == 1
        assert _errno(lambda: pub.loan(timeout=0.05)) == errno.ETIME  # the slow one still does
        slow.send("next")
        assert said(slow)["seq"] == 1
        assert _send(pub) == 3  # frame 1's slot, given back by both
        assert pub.subscribers == 2
        listing = dev.streams()[0]
        assert (listing["sent"], listing["in_use"]) == (3, 2)
        assert sorted(s["lag"] for s in listing["subscribers"]) == [2, 2]


def test_a_subscriber_killed_holding_a_frame_holds_the_publisher_up_for_under_a_second(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    with broker.connect("publisher") as dev, dev.publish("cam0", size=100, slots=2) as pub:
        holder = stream_peer("hold", broker.socket, "cam0")
        assert said(holder) == {"start": 1}
        _send(pub)
        assert said(holder) == {"holding": 1}
        _send(pub)
        assert _errno(lambda: pub.loan(timeout=0.05)) == errno.ETIME
        began = time.monotonic()
        os.kill(holder.proc.pid, signal.SIGKILL)
        with pub.loan(timeout=5) as frame:
            waited = time.monotonic() - began
            frame.send(1)
        assert waited < 1.0
        assert pub.subscribers == 0
        broker.wait_for(lambda: dev.streams()[0]["subscribers"] == [])


def test_a_subscriber_that_leaves_is_dropped_at_once(broker: Broker) -> None:
    with broker.connect("publisher") as dev, broker.connect("subscriber") as other:
        pub = dev.publish("cam0", size=100, slots=1)
        sub = other.subscribe("cam0")
        _send(pub)
        assert _errno(lambda: pub.loan(timeout=0.05)) == errno.ETIME
        sub.close()
        _send(pub)
        assert dev.streams()[0]["subscribers"] == []
        pub.close()


def test_a_publisher_killed_mid_stream_ends_it_with_esrch_after_the_frames_sent(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    publisher = stream_peer("publish_until_killed", broker.socket, "cam0", 1000, 16, 10)
    assert said(publisher) == {"ready": True}
    with broker.connect("subscriber") as dev, dev.subscribe("cam0", timeout=5) as sub:
        publisher.send("go")
        assert said(publisher) == {"sent": 10}
        os.kill(publisher.proc.pid, signal.SIGKILL)
        for seq in range(1, 11):
            with sub.receive(timeout=5) as frame:
                assert (frame.seq, bytes(frame.memory)) == (seq, content(seq, 1000))
        began = time.monotonic()
        assert _errno(lambda: sub.receive(timeout=5)) == errno.ESRCH
        assert time.monotonic() - began < 1.0
        assert list(sub) == []  # iteration ends with the stream
        broker.wait_for(lambda: dev.streams() == [])
        assert _errno(lambda: dev.subscribe("cam0")) == errno.ENOENT


def test_a_discarded_loan_is_never_seen(broker: Broker, stream_peer: Callable[..., Peer]) -> None:
    with broker.connect("publisher") as dev, dev.publish("cam0", size=100, slots=2) as pub:
        subscriber = stream_peer("step", broker.socket, "cam0")
        assert said(subscriber) == {"start": 1}
        assert _send(pub, 1) == 1
        with pub.loan(timeout=5) as frame:
            frame.memory[0] = 99  # and then not sent
        loan = pub.loan(timeout=5)
        loan.memory[0] = 98
        loan.discard()
        assert _send(pub, 2) == 2
        for _ in range(2):
            subscriber.send("next")
        assert [said(subscriber) for _ in range(2)] == [{"seq": 1, "first": 1}, {"seq": 2, "first": 2}]
        subscriber.send("next")
        pub.close()
        assert said(subscriber) == {"errno": errno.ESRCH}


def test_subscribers_cannot_write_and_the_kernel_refuses_them(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    with broker.connect("publisher") as dev, dev.publish("cam0", size=100, slots=2) as pub:
        writer = stream_peer("write", broker.socket, "cam0")
        assert said(writer) == {"start": 1}
        _send(pub, 7)
        assert said(writer) == {"python": "refused", "readonly": True, "kernel": "EACCES"}


def test_a_late_subscriber_starts_at_the_next_frame(broker: Broker) -> None:
    with broker.connect("publisher") as dev, broker.connect("late") as other:
        pub = dev.publish("cam0", size=100, slots=2)
        for marker in (1, 2, 3):
            _send(pub, marker)  # nobody subscribes: slots are reused freely
        sub = other.subscribe("cam0")
        assert sub.start == 4
        assert _errno(lambda: sub.receive(timeout=0.02)) == errno.ETIME
        _send(pub, 4)
        with sub.receive(timeout=5) as frame:
            assert (frame.seq, frame.size, frame.memory[0]) == (4, 1, 4)
            assert 0 < frame.timestamp <= time.monotonic_ns()


def test_loans_and_frames_misused(broker: Broker) -> None:
    with broker.connect("publisher") as dev, broker.connect("subscriber") as other:
        pub = dev.publish("cam0", size=100, slots=2)
        sub = other.subscribe("cam0")
        loan = pub.loan()
        assert _errno(lambda: pub.loan()) == errno.EBUSY  # one loan at a time
        assert _errno(lambda: loan.send(101)) == errno.EINVAL  # more than a frame holds
        loan.send(100)
        assert _errno(lambda: loan.send(1)) == errno.EINVAL  # sent already
        with sub.receive() as frame:
            assert len(frame.memory) == 100
        with pytest.raises(ValueError):
            frame.memory[0]  # given back: its memory is gone from this frame
        pub.close()
        assert _errno(lambda: pub.loan()) == errno.EBADF


def test_subscribe_waits_for_the_stream_to_be_published(broker: Broker) -> None:
    with broker.connect("publisher") as dev, broker.connect("subscriber") as other:
        assert _errno(lambda: other.subscribe("cam0")) == errno.ENOENT
        assert _errno(lambda: other.subscribe("cam0", timeout=0.05)) == errno.ENOENT
        got: list[bufbroker.Subscriber] = []
        waiter = threading.Thread(target=lambda: got.append(other.subscribe("cam0", timeout=10)))
        waiter.start()
        time.sleep(0.1)
        dev.publish("cam0", size=10, slots=1)
        waiter.join(10)
        assert got and got[0].start == 1
