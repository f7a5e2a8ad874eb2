"""What a client makes the broker hold for timelines and fences is charged, bounded, and only
costs its own uid; nothing a holder does to a shared eventfd can stall the broker's loop."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Access

from conftest import Broker, Peer
from fence_fixtures import fence_peer

__all__ = ["fence_peer"]


def _errno(call: Callable[[], object]) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call()
    assert e.value.errno is not None
    return e.value.errno


def test_thousands_of_timelines_are_refused_and_another_uid_does_not_notice(
    broker: Broker, fence_peer: Callable[..., Peer], other_uid: int
) -> None:
    limit = 256  # the default max_timelines_per_uid
    with broker.connect("greedy") as dev:
        made = []
        refused = 0
        for _ in range(2000):
            try:
                made.append(dev.timeline())
            except bufbroker.BrokerError as e:
                assert e.errno == errno.EDQUOT
                refused += 1
                if refused > 50:
                    break
        assert len(made) == limit
        assert dev.stats()["usage"]["timelines"] == limit
        stranger = fence_peer("stranger", broker.socket, other_uid)
        seen = json.loads(stranger.line())
        assert seen["ok"] and seen["timelines"] == ["mine"]  # and none of the greedy uid's
        assert seen["usage"]["timelines"] == 1
        assert stranger.finish() == 0
        made[0].close()
        dev.timeline()  # the freed one's charge is back


def test_thousands_of_fences_are_refused_until_some_are_closed(broker: Broker) -> None:
    limit = 1024  # the default max_fences_per_uid
    with broker.connect("greedy") as dev, broker.connect("bystander") as other:
        tl = dev.timeline()
        fences = [tl.fence(i) for i in range(limit)]
        assert _errno(lambda: tl.fence(limit)) == errno.EDQUOT
        assert _errno(lambda: dev.merge_fences(fences[1], fences[2])) == errno.EDQUOT
        fd_count = broker.fd_count()
        assert _errno(lambda: tl.fence(limit)) == errno.EDQUOT
        assert broker.fd_count() <= fd_count  # a refusal costs no descriptor
        for fence in fences[:10]:
            fence.close()
        broker.wait_for(lambda: dev.stats()["usage"]["fences"] == limit - 10)
        tl.fence(limit + 1)
        other.ping()


def test_a_fence_names_at_most_16_timelines(broker: Broker) -> None:
    with broker.connect() as dev:
        timelines = [dev.timeline() for _ in range(bufbroker.protocol.MAX_FENCE_TIMELINES + 1)]
        fence = timelines[0].fence(1)
        for tl in timelines[1:-1]:
            fence = dev.merge_fences(fence, tl.fence(1))
        assert len(fence.info()) == 16
        assert _errno(lambda: dev.merge_fences(fence, timelines[-1].fence(1))) == errno.E2BIG


def test_a_reservation_is_bounded(broker_factory: Callable[..., Broker]) -> None:
    broker = broker_factory("--max-fences-per-buffer", "4")
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        timelines = [dev.timeline() for _ in range(5)]
        for tl in timelines[:4]:
            buf.attach_fence(tl.fence(1), Access.READ)
        assert _errno(lambda: buf.attach_fence(timelines[4].fence(1), Access.READ)) == errno.EDQUOT
        timelines[0].signal(1)  # reached points leave the reservation
        buf.attach_fence(timelines[4].fence(1), Access.READ)


def test_a_read_only_holder_cannot_add_a_write_fence(broker: Broker) -> None:
    with broker.connect() as dev, broker.connect() as other:
        buf = dev.allocate(4096)
        handle = buf.share(readonly=True)
        seen = other.import_handle(handle)
        os.close(handle)
        fence = other.timeline().fence(1)
        assert _errno(lambda: seen.attach_fence(fence, Access.WRITE)) == errno.EACCES
        seen.attach_fence(fence, Access.READ)


def test_a_holder_that_jams_the_eventfd_cannot_stall_the_broker(broker: Broker) -> None:
    """Clearing O_NONBLOCK on the shared eventfd and filling its counter would make the broker's
    write block when the signaller dies; the broker writes from a worker thread instead."""
    with broker.connect("bystander") as bystander:
        signaller = broker.connect("signaller")
        tl = signaller.timeline()
        fd = tl.share()
        with broker.connect("jammer") as jammer:
            held = jammer.import_timeline(fd)
            os.close(fd)
            efd = held._view.eventfd
            fcntl.fcntl(efd, fcntl.F_SETFL, fcntl.fcntl(efd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE - 1)  # full, whatever was there
            signaller.close()  # the broker fails the timeline with ESRCH and writes the eventfd
            broker.wait_for(lambda: held.error == errno.ESRCH)
            for _ in range(20):
                bystander.ping()
            assert bystander.timeline().fence(0).status == 1
            os.eventfd_read(efd)  # let the broker's blocked write through
