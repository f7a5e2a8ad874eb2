"""Freeing large backings: off the event loop, and never lost."""

from __future__ import annotations

import os
import threading

import trio
import trio.testing

from bufbroker import Access
from bufbroker.broker._heap import Backing, allocate_memfd
from bufbroker.broker._reaper import LARGE, Reaper

from conftest import Broker


class _SlowToClose(Backing):
    """A real memfd whose close waits until the test lets it go, as freeing a GiB takes a while."""

    __slots__ = ("closing", "go")

    def __init__(self, size: int) -> None:
        backing = allocate_memfd(size, "slow")
        super().__init__(backing.fd, backing.size)
        self.closing = threading.Event()
        self.go = threading.Event()

    def close(self) -> None:
        self.closing.set()
        assert self.go.wait(10)
        super().close()


async def test_a_large_backing_is_closed_in_a_thread_while_the_loop_runs_on() -> None:
    reaper = Reaper()
    large, small = _SlowToClose(LARGE), allocate_memfd(LARGE - 4096, "small")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.run)
        reaper.free(small)
        assert small.fd == -1  # at once: a thread would cost more than it does
        reaper.free(large)  # returns at once: a close here would wait for the test, forever
        await trio.to_thread.run_sync(large.closing.wait)
        await trio.sleep(0.01)  # the loop runs on while the close is under way
        assert large.fd >= 0
        large.go.set()
        while large.fd >= 0:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()


def test_what_is_still_queued_is_closed_when_the_broker_stops() -> None:
    reaper = Reaper()
    queued = allocate_memfd(LARGE, "queued")
    reaper.free(queued)
    assert queued.fd >= 0
    reaper.close()
    assert queued.fd == -1


def _memfds(broker: Broker) -> int:
    links = (os.readlink(f"/proc/{broker.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{broker.pid}/fd"))
    return sum(link.startswith("/memfd:bufbroker:") for link in links)


def test_a_released_large_buffer_leaves_the_broker(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(LARGE * 2)
        with buf.cpu_access(Access.WRITE) as memory:
            memory[:] = b"\x01" * len(memory)
        assert _memfds(broker) == 1
        buf.close()
        dev.ping()
        broker.wait_for(lambda: _memfds(broker) == 0)
