"""What a client makes the broker hold for streams is charged per uid, bounded, and private."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import protocol as p

from conftest import Broker, Peer
from stream_fixtures import said, stream_peer

__all__ = ["stream_peer"]


def _errno(call: Callable[[], object]) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call()
    assert e.value.errno is not None
    return e.value.errno


def test_bad_arguments(broker: Broker) -> None:
    with broker.connect("publisher") as dev:
        assert _errno(lambda: dev.publish("s", size=0, slots=1)) == errno.EINVAL
        assert _errno(lambda: dev.publish("s", size=10, slots=0)) == errno.EINVAL
        assert _errno(lambda: dev.publish("s", size=10, slots=65)) == errno.EINVAL
        assert _errno(lambda: dev.publish("", size=10, slots=1)) == errno.EINVAL
        assert _errno(lambda: dev.publish("x" * 32, size=10, slots=1)) == errno.EINVAL
        assert _errno(lambda: dev.publish("s", size=8 << 30, slots=1)) == errno.EINVAL  # max_buffer_size
        dev.publish("s", size=10, slots=1)
        assert _errno(lambda: dev.publish("s", size=10, slots=1)) == errno.EEXIST
        assert _errno(lambda: dev._call(p.Unsubscribe(subscriber=12345))) == errno.EBADF
        assert _errno(lambda: dev._call(p.StreamMembers(stream=12345))) == errno.EBADF
        dev.ping()  # and the broker serves on


def test_streams_and_their_pools_are_charged_and_given_back(broker_factory: Callable[..., Broker]) -> None:
    broker = broker_factory("--max-streams-per-uid", "3", "--max-bytes-per-uid", "1M")
    with broker.connect("publisher") as dev:
        pubs = [dev.publish(f"s{i}", size=4096, slots=4) for i in range(3)]
        assert _errno(lambda: dev.publish("s3", size=10, slots=1)) == errno.EDQUOT
        usage = dev.stats()["usage"]
        assert (usage["streams"], usage["buffers"], usage["bytes"]) == (3, 3, 3 * 5 * 4096)
        pubs[0].close()
        assert _errno(lambda: dev.publish("big", size=1 << 20, slots=1)) == errno.EDQUOT  # bytes
        dev.publish("s3", size=10, slots=1)
    with broker.connect("after") as dev:
        usage = dev.stats()["usage"]
        assert (usage["streams"], usage["buffers"], usage["bytes"], usage["timelines"]) == (0, 0, 0, 0)


def test_subscribers_are_bounded_per_stream_and_per_uid(broker_factory: Callable[..., Broker]) -> None:
    broker = broker_factory("--max-subscribers-per-stream", "2", "--max-subscriptions-per-uid", "3")
    before = broker.fd_count()
    with broker.connect("publisher") as dev, broker.connect("greedy") as other:
        dev.publish("a", size=10, slots=1)
        dev.publish("b", size=10, slots=1)
        subs = [other.subscribe("a"), other.subscribe("a")]
        assert _errno(lambda: other.subscribe("a")) == errno.EUSERS
        subs.append(other.subscribe("b"))
        assert _errno(lambda: dev.subscribe("b")) == errno.EDQUOT  # the uid's three are taken
        assert other.stats()["usage"]["subscriptions"] == 3
        subs[0].close()
        dev.subscribe("a")
    broker.wait_for(lambda: broker.fd_count() == before)


def test_a_stream_of_another_uid_is_invisible_and_untouchable(
    broker: Broker, stream_peer: Callable[..., Peer], other_uid: int
) -> None:
    with broker.connect("publisher") as dev, broker.connect("subscriber") as other:
        pub = dev.publish("cam0", size=10, slots=1)
        other.subscribe("cam0")
        stranger = stream_peer("stranger", broker.socket, other_uid, "cam0")
        assert said(stranger) == {
            "subscribe": errno.ENOENT,
            "unpublish": errno.EBADF,
            "unsubscribe": errno.EBADF,
            "members": errno.EBADF,
            "listed": ["cam0"],
            "usage": 1,
        }
        assert stranger.finish() == 0
        with pub.loan() as frame:
            frame.send(1)  # undisturbed


def test_nothing_is_left_behind_when_members_come_and_go(broker: Broker) -> None:
    before = broker.fd_count()
    with broker.connect("publisher") as dev:
        for round in range(20):
            with dev.publish("cam0", size=8192, slots=3) as pub, broker.connect("subscriber") as other:
                subs = [other.subscribe("cam0") for _ in range(3)]
                for _ in range(5):
                    with pub.loan(timeout=5) as frame:
                        frame.send(round)
                    for sub in subs:
                        with sub.receive(timeout=5):
                            pass
                subs[0].close()
    broker.wait_for(lambda: broker.fd_count() == before)
    with broker.connect("after") as dev:
        assert dev.streams() == [] and dev.timelines() == []


def test_a_publisher_scribbling_on_its_control_page_harms_only_its_stream(broker: Broker) -> None:
    with broker.connect("publisher") as dev, broker.connect("subscriber") as other:
        pub = dev.publish("cam0", size=4096, slots=2)
        words = pub._core.pool.words  # the publisher maps the whole pool read-write
        words[4] = (1 << 64) - 1  # the members word, which the broker bumps
        sub = other.subscribe("cam0")  # the broker's bump wraps around
        with pub.loan(timeout=1) as frame:
            frame.send(10)
        words[8 + 4 * 0 + 1] = 1 << 40  # a frame's size past the slot
        assert _errno(lambda: sub.receive(timeout=1)) == errno.EPROTO
        sub.close()
        assert dev.streams()[0]["subscribers"] == []
        pub.close()
        other.ping()


def test_streams_of_one_uid_filling_the_descriptor_table_leave_root_its_reserve(
    broker_factory: Callable[..., Broker], stream_peer: Callable[..., Peer], other_uid: int
) -> None:
    b = broker_factory("--max-streams-per-uid", "1000", "--fd-reserve", "64", nofile=400)
    hoarder = stream_peer("fill_streams", b.socket, other_uid)
    report = said(hoarder)
    assert report["errno"] == errno.EMFILE and report["published"] > 50, report
    with b.connect("root") as root, b.connect("root-too") as other:  # within the reserve
        pub = root.publish("after", size=100, slots=2)
        sub = other.subscribe("after")
        with pub.loan(timeout=1) as frame:
            frame.memory[:2] = b"ok"
            frame.send(2)
        with sub.receive(timeout=1) as got:
            assert bytes(got.memory) == b"ok"
    hoarder.send("end")
