"""Streams from trio: the same frames, waits and errors, with other processes on the far side."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
import trio

import bufbroker

from conftest import Broker, Peer
from stream_fixtures import said, stream_peer
from stream_peer import content

__all__ = ["stream_peer"]


def test_a_trio_publisher_feeds_a_blocking_subscriber_process(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    async def main() -> None:
        async with (
            bufbroker.open_device("publisher", socket=broker.socket) as dev,
            dev.publish("cam0", size=50_000, slots=3) as pub,
        ):
            subscriber = stream_peer("subscribe", broker.socket, "cam0", 100)
            assert said(subscriber) == {"start": 1}
            for _ in range(100):
                async with pub.loan(timeout=10) as frame:
                    data = content(frame.seq, pub.size)
                    frame.memory[: len(data)] = data
                    frame.send(len(data))
            assert pub.sent == 100 and pub.subscribers == 1
            assert said(subscriber) == {"seqs": list(range(1, 101)), "bad": 0}
            subscriber.send("end")

    trio.run(main)


def test_async_for_receives_until_the_publisher_ends_the_stream(
    broker: Broker, stream_peer: Callable[..., Peer]
) -> None:
    publisher = stream_peer("publish", broker.socket, "cam0", 10_000, 2, 50)
    assert said(publisher) == {"ready": True}

    async def main() -> list[int]:
        seqs = []
        async with (
            bufbroker.open_device("subscriber", socket=broker.socket) as dev,
            dev.subscribe("cam0", timeout=5) as sub,
        ):
            publisher.send("go")
            async for frame in sub:
                assert bytes(frame.memory) == content(frame.seq, sub.size)
                seqs.append(frame.seq)
                if frame.seq == 50:
                    publisher.send("end")  # the stream ends after the frames sent
        return seqs

    assert trio.run(main) == list(range(1, 51))
    assert said(publisher) == {"sent": 50}
    assert publisher.finish() == 0


def test_trio_backpressure_timeouts_and_a_cancelled_loan(broker: Broker) -> None:
    async def main() -> None:
        async with (
            bufbroker.open_device("publisher", socket=broker.socket) as dev,
            bufbroker.open_device("subscriber", socket=broker.socket) as other,
        ):
            pub = await dev.publish("cam0", size=100, slots=1)
            sub = await other.subscribe("cam0")
            async with pub.loan() as frame:
                frame.send(1)
            with pytest.raises(bufbroker.BrokerError) as e:
                await pub.loan(timeout=0.05)
            assert e.value.errno == errno.ETIME
            with trio.move_on_after(0.05):
                await pub.loan()
            async with sub.receive(timeout=1) as got:
                assert got.seq == 1
            async with pub.loan(timeout=1) as frame:  # the cancelled loan left nothing behind
                frame.send(2)
            with pytest.raises(bufbroker.BrokerError) as e:
                async with sub.receive(timeout=1) as got:
                    await sub.close()
                    await pub.close()
                    async with sub.receive(timeout=1):
                        pass
            assert e.value.errno == errno.EBADF

    trio.run(main)
