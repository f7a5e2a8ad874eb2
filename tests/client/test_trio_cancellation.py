"""Cancellation in the trio client: nothing leaks in the broker, the connection stays usable.

To cancel a request mid-flight for certain, the broker is stopped (SIGSTOP), the request is
sent, and once every task is blocked (the request sent, its reply not come) the task is
cancelled; then the broker continues: it answers a request nobody waits for any more, and the
client must undo what that request created. Ids are plain counters in the
broker, so an id skipped by one proves the cancelled request reached it.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import trio
import trio.testing

import bufbroker
from bufbroker import Access, Direction
from bufbroker.client.trio import Buffer, Device

from conftest import Broker


@contextmanager
def stopped(broker: Broker) -> Iterator[None]:
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


async def abandon(broker: Broker, *calls: Callable[[], Awaitable[object]]) -> None:
    """Send each call's request to the stopped broker, then cancel the tasks waiting for replies."""
    finished = 0

    async def run(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal finished
        await call()
        finished += 1

    with stopped(broker):
        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(run, call)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert finished == 0


async def entry(dev: Device, buf: Buffer) -> dict[str, Any]:
    [found] = [b for b in await dev.buffers() if b["id"] == buf.id]
    return found


async def held(dev: Device) -> set[int]:
    """The buffers ``dev`` holds: exact after any round trip (undos are applied in order)."""
    return {b["id"] for b in await dev.buffers() if any(i["device"] == dev.id for i in b["importers"])}


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll: the broker learns of closed handles, and frees their buffers, asynchronously."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.005)


async def all_freed(dev: Device) -> None:
    async def empty() -> bool:
        return await dev.buffers() == []

    await eventually(empty)


async def test_cancelled_allocate_is_released(broker: Broker) -> None:
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        before = await dev.allocate(4096)
        await before.close()
        await abandon(broker, partial(dev.allocate, 4096, name="abandoned"))
        await dev.ping()  # the abandoned reply came before this one; its release went out then
        assert await held(dev) == set()
        await all_freed(dev)  # once the broker has seen the abandoned handle closed
        after = await dev.allocate(4096, name="abandoned")  # the name is free again
        assert after.id == before.id + 2
        await after.close()


async def test_cancelled_attach_is_detached(broker: Broker) -> None:
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        first = await buf.attach()
        await first.detach()
        await abandon(broker, buf.attach)
        await dev.ping()
        assert (await entry(dev, buf))["attachments"] == []
        async with buf.attach() as att:
            assert att.id == first.id + 2
        await buf.close()  # EBUSY if the abandoned attachment were still there
        assert await held(dev) == set()


async def test_cancelled_map_is_unmapped(broker: Broker) -> None:
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(3 * 4096)
        async with buf.attach() as att:
            await abandon(broker, partial(att.map, Direction.FROM_DEVICE))
            await dev.ping()
            assert (await dev.stats())["mappings"] == 0
            # Nothing mapped any more: another direction is allowed (EBUSY while mapped).
            async with att.map(Direction.TO_DEVICE) as m:
                assert m.memory.readonly
        await buf.close()


async def test_cancelled_cpu_access_is_ended(broker: Broker) -> None:
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)

        async def write() -> None:
            async with buf.cpu_access(Access.WRITE) as mem:
                mem[:1] = b"x"  # never reached

        await abandon(broker, write)
        await dev.ping()
        assert (await entry(dev, buf))["cpu_access"] == []
        async with buf.cpu_access(Access.READ) as mem:
            assert mem[:1] == b"\0"
        await buf.close()


async def test_cancelled_share_closes_the_handle(broker: Broker) -> None:
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        handles = (await entry(dev, buf))["handles"]
        await abandon(broker, buf.share)

        async def back_to_before() -> bool:
            return bool((await entry(dev, buf))["handles"] == handles)

        await eventually(back_to_before)  # the minted handle was closed on arrival
        await buf.close()


async def test_cancelled_import_and_open_are_released(broker: Broker) -> None:
    async with (
        bufbroker.open_device("owner", socket=broker.socket) as owner,
        bufbroker.open_device("other", socket=broker.socket) as other,
    ):
        buf = await owner.allocate(4096, name="shared")
        handle = await buf.share()
        await abandon(broker, partial(other.import_handle, handle), partial(other.open, "shared"))
        os.close(handle)
        await other.ping()
        assert [i["name"] for i in (await entry(owner, buf))["importers"]] == ["owner"]
        theirs = await other.open("shared")  # and the connection still works
        await theirs.close()
        await buf.close()


async def test_cancelled_export_memfd_is_released(broker: Broker) -> None:
    fd = os.memfd_create("mine", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        async with bufbroker.open_device("udmabuf", socket=broker.socket) as dev:
            await abandon(broker, partial(dev.export_memfd, fd))
            await dev.ping()
            assert await held(dev) == set()
            await all_freed(dev)
    finally:
        os.close(fd)


async def test_cleanup_of_a_cancelled_block_is_still_sent(broker: Broker) -> None:
    """Unmap and detach on the way out of a cancelled block reach the broker all the same."""
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        with trio.CancelScope() as scope:
            async with buf.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
                m.memory[:2] = b"hi"
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert m.unmapped and att.detached
        await dev.ping()
        assert (await entry(dev, buf))["attachments"] == []
        with trio.move_on_after(0) as scope:  # cancelled before the release is even sent
            await buf.close()
        assert scope.cancelled_caught and buf.closed and buf.handle is None
        await dev.ping()
        assert await held(dev) == set()
        await all_freed(dev)


async def test_cancelled_while_waiting_for_a_cleanup_reply(broker: Broker) -> None:
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        att = await buf.attach()
        await abandon(broker, att.detach)
        assert att.detached
        await buf.close()
        assert await held(dev) == set()


async def test_abandoned_open_with_timeout_is_released(broker: Broker) -> None:
    """``open`` with a timeout is answered out of order, whenever the name appears."""
    async with bufbroker.open_device("patient", socket=broker.socket) as dev:
        with trio.move_on_after(0.1):
            await dev.open("later", timeout=30)
        async with bufbroker.open_device("maker", socket=broker.socket) as maker:
            made = await maker.allocate(4096, name="later")

            async def only_the_maker_holds_it() -> bool:
                return [i["name"] for i in (await entry(maker, made))["importers"]] == ["maker"]

            await eventually(only_the_maker_holds_it)
        await dev.ping()


async def test_random_cancellation_does_not_leak(broker: Broker) -> None:
    rng = random.Random(7)
    async with bufbroker.open_device("jittery", socket=broker.socket) as dev:
        kept: list[Buffer] = []
        attached: set[int] = set()

        async def try_once() -> None:
            with trio.move_on_after(rng.choice([0, 1e-5, 1e-4, 1e-3, 1])):
                buf = await dev.allocate(4096)
                kept.append(buf)
                att = await buf.attach()
                attached.add(att.id)
                async with att.map(Direction.TO_DEVICE):
                    await trio.sleep(rng.choice([0, 1e-3]))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(try_once)
        await dev.ping()
        assert await held(dev) == {b.id for b in kept}  # every abandoned allocate was released
        listing = await dev.buffers()
        assert {a["id"] for b in listing for a in b["attachments"]} == attached
        assert (await dev.stats())["mappings"] == 0


async def test_cancelling_the_whole_block(broker: Broker) -> None:
    with trio.move_on_after(0.1) as scope:
        async with bufbroker.open_device("short-lived", socket=broker.socket) as dev:
            await dev.allocate(4096, name="held")
            await dev.open("never", timeout=60)
    assert scope.cancelled_caught
    async with bufbroker.open_device("inspector", socket=broker.socket) as inspector:
        await all_freed(inspector)  # the connection ended, and everything with it
        assert [d["name"] for d in await inspector.devices()] == ["inspector"]


async def test_a_call_made_in_a_cancelled_scope_sends_nothing(broker: Broker) -> None:
    """Cancelled before it starts, a call raises Cancelled and the broker never hears of it.

    ``set_name`` has nothing to undo, so a request sent all the same would show in the name.
    """
    async with bufbroker.open_device("cam", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        with trio.CancelScope() as scope:
            scope.cancel()
            await buf.set_name("never")
        assert scope.cancelled_caught
        assert buf.name is None
        assert (await entry(dev, buf))["name"] is None
        await buf.set_name("now")  # the connection is as good as before
        assert (await entry(dev, buf))["name"] == "now"
