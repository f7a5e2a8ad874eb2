"""Many tasks on one trio device: requests pipelined, each reply to its own task."""

from __future__ import annotations

import os

import trio
import trio.testing

import bufbroker
from bufbroker import Access, Direction
from bufbroker.client.trio import Device

from conftest import Broker

TASKS = 50


async def held(dev: Device) -> set[int]:
    return {b["id"] for b in await dev.buffers() if any(i["device"] == dev.id for i in b["importers"])}


async def test_fifty_tasks_allocate_attach_map_on_one_device(broker: Broker) -> None:
    async with bufbroker.open_device("busy", socket=broker.socket) as dev:
        seen: dict[int, int] = {}

        async def worker(i: int) -> None:
            buf = await dev.allocate(4096 * (1 + i % 3), name=f"w{i}")
            assert buf.name == f"w{i}" and buf.size == 4096 * (1 + i % 3)
            async with buf.attach() as att:
                async with att.map(Direction.BIDIRECTIONAL) as m:
                    m.memory[:4] = i.to_bytes(4, "little")
                    m.memory[-4:] = i.to_bytes(4, "little")
                    await trio.sleep(0)  # let the others interleave while this is mapped
                async with buf.cpu_access(Access.READ) as mem:
                    seen[i] = int.from_bytes(mem[:4], "little") + int.from_bytes(mem[-4:], "little")
            await buf.close()

        async with trio.open_nursery() as nursery:
            for i in range(TASKS):
                nursery.start_soon(worker, i)
        assert seen == {i: 2 * i for i in range(TASKS)}  # each task saw its own buffer
        assert await held(dev) == set()
        stats = await dev.stats()
        assert (stats["attachments"], stats["mappings"]) == (0, 0)


async def test_tasks_hold_state_at_once(broker: Broker) -> None:
    """All fifty attached and mapped at the same moment, as the broker sees it."""
    async with bufbroker.open_device("busy", socket=broker.socket) as dev:
        everyone_mapped = trio.Event()
        mapped = 0

        async def worker(i: int) -> None:
            nonlocal mapped
            buf = await dev.allocate(4096)
            async with buf.attach() as att, att.map(Direction.TO_DEVICE):
                mapped += 1
                if mapped == TASKS:
                    everyone_mapped.set()
                await everyone_mapped.wait()
                await snapshot.wait()
            await buf.close()

        snapshot = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(TASKS):
                nursery.start_soon(worker, i)
            await everyone_mapped.wait()
            stats = await dev.stats()
            assert (stats["buffers"], stats["attachments"], stats["mappings"]) == (TASKS, TASKS, TASKS)
            snapshot.set()
        assert await held(dev) == set()


async def test_one_attachment_mapped_by_many_tasks(broker: Broker) -> None:
    """Mapping a mapped attachment again (same direction) shares its segments; count + 1."""
    async with bufbroker.open_device("shared-map", socket=broker.socket) as dev:
        buf = await dev.allocate(4 * 4096)
        async with buf.attach() as att:
            maps = []

            async def map_once() -> None:
                maps.append(await att.map(Direction.BIDIRECTIONAL))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(map_once)
            [entry] = [b for b in await dev.buffers() if b["id"] == buf.id]
            assert entry["attachments"][0]["map_count"] == 10
            assert all(m.segments == maps[0].segments for m in maps)
            maps[0].memory[:3] = b"one"
            assert all(bytes(m.memory[:3]) == b"one" for m in maps)  # one memory, many views
            async with trio.open_nursery() as nursery:
                for m in maps:
                    nursery.start_soon(m.unmap)
            assert (await dev.stats())["mappings"] == 0
        await buf.close()


async def test_a_waiting_request_does_not_hold_up_the_others(broker: Broker) -> None:
    """``open`` with a timeout waits in the broker while other requests go past it."""
    async with bufbroker.open_device("waiter", socket=broker.socket) as dev:
        got: list[int] = []

        async def wait_for_it() -> None:
            buf = await dev.open("late", timeout=30)
            got.append(buf.id)
            await buf.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(20):
                await dev.ping()
            mine = await dev.allocate(4096)
            assert got == []
            async with bufbroker.open_device("maker", socket=broker.socket) as maker:
                made = await maker.allocate(4096, name="late")
                with trio.fail_after(5):
                    while not got:
                        await trio.sleep(0.005)
                assert got == [made.id]
        await mine.close()


async def test_listings_page_while_others_allocate(broker: Broker) -> None:
    """More buffers than one page holds, listed while other tasks keep allocating."""
    async with bufbroker.open_device("many", socket=broker.socket) as dev:
        first = [await dev.allocate(4096) for _ in range(300)]
        more: list[int] = []

        async def allocate_more() -> None:
            for _ in range(50):
                more.append((await dev.allocate(4096)).id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(allocate_more)
            listing = await dev.buffers()
        ids = [b["id"] for b in listing]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert {b.id for b in first} <= set(ids) <= {b.id for b in first} | set(more)
        assert await held(dev) == {b.id for b in first} | set(more)


async def test_two_devices_in_one_program(broker: Broker) -> None:
    """A buffer shared between two devices of one trio program, each with its own tasks."""
    async with (
        bufbroker.open_device("camera", socket=broker.socket) as camera,
        bufbroker.open_device("encoder", socket=broker.socket) as encoder,
    ):
        frames: list[int] = []
        send, receive = trio.open_memory_channel[int](0)

        async def produce() -> None:
            async with send:
                for n in range(10):
                    buf = await camera.allocate(4096)
                    async with buf.cpu_access(Access.WRITE) as mem:
                        mem[:8] = n.to_bytes(8, "little")
                    handle = await buf.share(readonly=True)
                    await send.send(handle)
                    await buf.close()

        async def consume() -> None:
            async with receive:
                async for handle in receive:
                    buf = await encoder.import_handle(handle)
                    os.close(handle)
                    async with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
                        frames.append(int.from_bytes(m.memory[:8], "little"))
                    await buf.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
        assert frames == list(range(10))
        assert await held(camera) == await held(encoder) == set()
