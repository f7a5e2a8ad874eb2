"""trio waiters of timelines and fences signalled by other processes, and what a stopped broker
changes (nothing for waits; a fence's descriptor turns readable only once it runs again)."""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Callable

import pytest
import trio

import bufbroker

from conftest import Broker, Peer
from fence_fixtures import channel, fence_peer

__all__ = ["channel", "fence_peer"]


async def test_trio_waiters_wake_for_another_process_and_for_its_death(
    broker: Broker,
    fence_peer: Callable[..., Peer],
    channel,  # type: ignore[no-untyped-def]
) -> None:
    ours, theirs = channel()
    signaller = fence_peer("signaller", broker.socket, theirs.fileno(), 1, pass_fds=(theirs.fileno(),))
    handle = bufbroker.recv_handle(ours)
    assert signaller.line()
    async with bufbroker.open_device("trio-waiter", socket=broker.socket) as dev:
        tl = await dev.import_timeline(handle)
        os.close(handle)
        woke: dict[int, int] = {}

        async def wait(point: int) -> None:
            try:
                await tl.wait(point, timeout=20)
                woke[point] = 0
            except bufbroker.BrokerError as e:
                woke[point] = e.errno or -1

        async with trio.open_nursery() as nursery:
            for point in (1, 2, 5, 9):
                nursery.start_soon(wait, point)
            await trio.sleep(0.1)
            signaller.send("signal 2")
            await trio.to_thread.run_sync(signaller.line)
            with trio.fail_after(5):
                while len(woke) < 2:
                    await trio.sleep(0.01)
            assert woke == {1: 0, 2: 0}
            killed = time.monotonic()
            signaller.proc.send_signal(signal.SIGKILL)
        assert woke == {1: 0, 2: 0, 5: errno.ESRCH, 9: errno.ESRCH}
        assert time.monotonic() - killed < 2


def test_waits_go_on_while_the_broker_is_stopped_and_the_descriptor_follows(broker: Broker) -> None:
    with broker.connect("signaller") as dev, broker.connect("waiter") as other:
        tl = dev.timeline()
        made = tl.fence(1)
        fd = made.share()
        fence = other.import_fence(fd)
        os.close(fd)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(bufbroker.BrokerError) as e:
                fence.wait(timeout=0)
            assert e.value.errno == errno.ETIME
            tl.signal(1)
            fence.wait(timeout=5)  # the pages: no broker needed
            assert fence.status == 1
            readable, _, _ = select.select([fence.fileno()], [], [], 0.2)
            assert not readable  # the descriptor is the broker's to signal
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        readable, _, _ = select.select([fence.fileno()], [], [], 5)
        assert readable
