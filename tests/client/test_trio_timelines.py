"""Timelines and fences under trio: many tasks on many timelines through one epoll per process."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import trio

import bufbroker
from bufbroker import Access

from conftest import Broker

TIMELINES, TASKS = 10, 60


async def test_many_tasks_wait_on_many_timelines(broker: Broker) -> None:
    """Each task wakes when its own point is reached, signalled from another process's device."""
    with broker.connect("signaller") as signaller:
        timelines = [signaller.timeline() for _ in range(TIMELINES)]
        async with bufbroker.open_device("waiters", socket=broker.socket) as dev:
            waiting = []
            for tl in timelines:
                fd = tl.share()
                waiting.append(await dev.import_timeline(fd))
                os.close(fd)
            woke: list[tuple[int, int]] = []

            async def waiter(i: int) -> None:
                tl, point = waiting[i % TIMELINES], 1 + i // TIMELINES
                await tl.wait(point, timeout=10)
                woke.append((tl.id, point))

            async with trio.open_nursery() as nursery:
                for i in range(TASKS):
                    nursery.start_soon(waiter, i)
                await trio.sleep(0.05)
                assert woke == []
                for point in range(1, TASKS // TIMELINES + 1):
                    for tl in timelines:
                        # From a thread, as another process would: no trio, no broker.
                        await trio.to_thread.run_sync(tl.signal, point)
                    await trio.sleep(0.01)
            assert sorted(woke) == sorted((t.id, 1 + i // TIMELINES) for i, t in enumerate(timelines * 6))


async def test_a_cancelled_poller_hands_over(broker: Broker) -> None:
    """The task polling the epoll for everyone is cancelled; the others still wake."""
    async with bufbroker.open_device("dev", socket=broker.socket) as dev:
        first, second = await dev.timeline(), await dev.timeline()
        done = trio.Event()

        async def wait_second() -> None:
            await second.wait(1, timeout=10)
            done.set()

        async with trio.open_nursery() as nursery:
            poller = trio.CancelScope()

            async def wait_first() -> None:
                with poller:
                    await first.wait(1)

            nursery.start_soon(wait_first)  # the first to wait polls for everyone
            await trio.sleep(0.01)
            nursery.start_soon(wait_second)
            await trio.sleep(0.01)
            poller.cancel()
            await trio.sleep(0.01)
            await trio.to_thread.run_sync(second.signal, 1)
            with trio.fail_after(5):
                await done.wait()


async def test_timeouts_errors_and_fences(broker: Broker) -> None:
    async with bufbroker.open_device("dev", socket=broker.socket) as dev:
        tl = await dev.timeline(name="t")
        fence = await tl.fence(2)
        with pytest.raises(bufbroker.BrokerError) as e:
            await fence.wait(timeout=0.05)
        assert e.value.errno == errno.ETIME
        threading.Timer(0.05, tl.signal, (2,), {"error": errno.EIO}).start()
        with pytest.raises(bufbroker.BrokerError) as e:
            await fence.wait(timeout=5)
        assert e.value.errno == errno.EIO and fence.status == -errno.EIO
        assert (await dev.timelines())[0]["error"] == errno.EIO


async def test_cpu_access_waits_on_the_reservation(broker: Broker) -> None:
    async with bufbroker.open_device("dev", socket=broker.socket) as dev:
        buf, tl = await dev.allocate(4096), await dev.timeline()
        async with await tl.fence(1) as fence:
            await buf.attach_fence(fence, Access.WRITE)
        exported = await buf.export_fence(Access.READ)
        with pytest.raises(bufbroker.BrokerError) as e:
            async with buf.cpu_access(Access.READ, timeout=0.05):
                pass
        assert e.value.errno == errno.ETIME
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exported.wait, 5)
            trio.lowlevel.current_trio_token().run_sync_soon(tl.signal, 1)
            async with buf.cpu_access(Access.READ, timeout=5) as mem:
                assert len(mem) == 4096
        await dev.ping()
