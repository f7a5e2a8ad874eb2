"""The trio client: across processes with the blocking client, concurrency, cancellation."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import socket

import pytest
import trio

import bufbroker
from bufbroker import Access, Direction
from bufbroker.client.trio import recv_handle, send_handle

from conftest import Broker
from peer import pattern


async def test_trio_producer_blocking_consumer(broker: Broker, peer) -> None:
    a, b = socket.socketpair()
    size = 2 * 4096 + 7
    consumer = peer("consume", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    b.close()
    async with bufbroker.open_device("trio-producer", socket=broker.socket) as dev:
        buf = await dev.allocate(size)
        async with buf.cpu_access(Access.WRITE) as mem:
            mem[:size] = pattern(size)
        handle = await buf.share()
        with trio.socket.from_stdlib_socket(a) as ours:
            await send_handle(ours, handle)
        os.close(handle)
        seen = json.loads(await trio.to_thread.run_sync(consumer.line))
        assert seen["sha"] == hashlib.sha256(pattern(size)).hexdigest()
    consumer.finish()


async def test_blocking_producer_trio_consumer(broker: Broker, peer) -> None:
    a, b = socket.socketpair()
    size = 5 * 4096
    producer = peer("produce", broker.socket, a.fileno(), size, pass_fds=(a.fileno(),))
    a.close()
    made = json.loads(await trio.to_thread.run_sync(producer.line))
    producer.finish()
    with trio.socket.from_stdlib_socket(b) as theirs:
        handle = await recv_handle(theirs)
    async with bufbroker.open_device("trio-consumer", socket=broker.socket) as dev:
        buf = await dev.import_handle(handle)
        os.close(handle)
        assert buf.id == made["id"]
        async with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            assert hashlib.sha256(m.memory[:size]).hexdigest() == made["sha"]
            assert m.memory.readonly
        await buf.close()
        assert await dev.buffers() == []


async def test_many_tasks_share_one_device(broker: Broker) -> None:
    async with bufbroker.open_device("busy", socket=broker.socket) as dev:

        async def worker(i: int) -> None:
            buf = await dev.allocate(4096 * (1 + i % 3), name=f"w{i}")
            async with buf.attach() as att:
                async with att.map(Direction.BIDIRECTIONAL) as m:
                    m.memory[:4] = i.to_bytes(4, "little")
                async with buf.cpu_access(Access.READ) as mem:
                    assert int.from_bytes(mem[:4], "little") == i
            await buf.close()

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(worker, i)
        assert await dev.buffers() == []
        assert (await dev.stats())["mappings"] == 0


async def test_cancelled_waits_leave_nothing_behind(broker: Broker) -> None:
    async with bufbroker.open_device("patient", socket=broker.socket) as dev:
        with trio.move_on_after(0.2):
            await dev.open("later", timeout=30)  # the broker holds this request...
        with bufbroker.connect("maker", socket=broker.socket) as maker:
            made = maker.allocate(4096, name="later")  # ...and answers it now, to nobody
            for _ in range(200):
                [entry] = [b for b in maker.buffers() if b["id"] == made.id]
                if [i["name"] for i in entry["importers"]] == ["maker"]:
                    break  # the abandoned open was released again
                await trio.sleep(0.01)
            assert [i["name"] for i in entry["importers"]] == ["maker"]
        await dev.ping()  # the connection is still usable


async def test_random_cancellation_does_not_leak(broker: Broker) -> None:
    rng = random.Random(7)
    async with bufbroker.open_device("jittery", socket=broker.socket) as dev:
        kept: list[bufbroker.client.trio.Buffer] = []

        async def try_once() -> None:
            with trio.move_on_after(rng.choice([0, 1e-5, 1e-4, 1e-3, 1])):
                buf = await dev.allocate(4096)
                kept.append(buf)

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(try_once)
        await dev.ping()
        for _ in range(200):
            held = {b["id"] for b in await dev.buffers()}
            if held == {b.id for b in kept}:
                break
            await trio.sleep(0.01)
        assert held == {b.id for b in kept}  # every abandoned allocate was released


async def test_errors_carry_their_errno(broker: Broker) -> None:
    async with bufbroker.open_device("wrong", socket=broker.socket) as dev:
        with pytest.raises(bufbroker.BrokerError) as e:
            await dev.allocate(0)
        assert e.value.errno == errno.EINVAL
        buf = await dev.allocate(4096)
        att = await buf.attach()
        m = await att.map(Direction.TO_DEVICE)
        with pytest.raises(bufbroker.BrokerError) as e:
            await att.map(Direction.FROM_DEVICE)
        assert e.value.errno == errno.EBUSY
        await m.unmap()
        await att.detach()


async def test_missing_broker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(bufbroker.BrokerUnavailable):
        async with bufbroker.open_device("x", socket=str(tmp_path / "none.sock")):
            pass


async def test_a_broker_that_goes_away_fails_every_waiter(broker: Broker) -> None:
    async with bufbroker.open_device("orphan", socket=broker.socket) as dev:

        async def wait_forever() -> None:
            with pytest.raises(bufbroker.BrokerError) as e:
                await dev.open("never", timeout=60)
            assert e.value.errno == errno.ECONNRESET

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(wait_forever)
            await trio.sleep(0.2)
            broker.proc.kill()
