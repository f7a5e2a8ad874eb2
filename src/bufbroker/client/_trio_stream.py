"""Streams for the trio client: the same ring, waiting through the process's timeline epoll."""

from __future__ import annotations

import errno
import math
from typing import TYPE_CHECKING, Any

import trio

from .. import protocol as p
from ..protocol import BrokerError
from ._stream import FrameBase, LoanBase, PublisherCore, SubscriberCore
from ._trio_opening import AsyncClosing, Opening
from ._trio_timeline import _hub, _wake_up

if TYPE_CHECKING:
    from ._trio import Device

__all__ = ["Frame", "Loan", "Publisher", "Subscriber"]


class Publisher(AsyncClosing):
    """A stream this device publishes: ``async with pub.loan() as frame``, fill, ``frame.send(n)``."""

    def __init__(self, device: Device, result: dict[str, Any], fds: list[int]) -> None:
        self._device = device
        self._core = PublisherCore(device._views, result, fds)
        self.id, self.name = self._core.id, self._core.name
        self.size, self.slots = self._core.size, self._core.slots
        device._syncs.add(self)

    @property
    def subscribers(self) -> int:
        return self._core.subscribers

    @property
    def sent(self) -> int:
        return self._core.seq - 1

    def loan(self, timeout: float | None = None) -> Opening[Loan]:
        """The next slot, once every subscriber gave back the frame it held (ETIME after ``timeout``)."""
        return Opening(lambda: self._loan(timeout))

    async def _loan(self, timeout: float | None) -> Loan:
        core = self._core
        core.reserve()
        try:
            hub = _hub()
            with trio.move_on_after(math.inf if timeout is None else timeout):
                while True:
                    if core.stale():
                        await self._refresh()
                    waiting = core.pending()
                    if not waiting:
                        await trio.lowlevel.checkpoint_if_cancelled()
                        return Loan(core)
                    for view in waiting:
                        hub.epoll.watch(view)  # before the second look: a later signal cannot be missed
                    if core.pending():
                        await _wake_up(hub, [view.eventfd for view in waiting])
            raise core.timed_out(timeout)
        except BaseException:
            core.loaned = False
            raise

    async def _refresh(self) -> None:
        core = self._core
        try:
            request = core.members_request()
            while core.apply_members(*await self._device._call(request)):
                request = core.members_request()
        except BaseException:
            core.invalidate()
            raise

    async def close(self) -> None:
        """End the stream: subscribers receive what was sent, then ESRCH."""
        if not self._core.closed and not self._device.closed:
            await self._device._settle(p.Unpublish(stream=self.id), self._close_local)
        else:
            self._close_local()

    def _close_local(self) -> None:
        self._core.close_local()
        self._device._syncs.discard(self)


class Loan(LoanBase, AsyncClosing):
    """A slot on loan (``async with pub.loan() as frame``): ``memory``, ``seq``, ``send(nbytes)``."""

    async def close(self) -> None:
        """Give the slot back; unsent, it is discarded and no subscriber ever sees it."""
        self._finish()
        await trio.lowlevel.checkpoint()


class Subscriber(AsyncClosing):
    """A subscription: ``async with sub.receive() as frame``, or ``async for frame in sub``."""

    def __init__(self, device: Device, result: dict[str, Any], fds: list[int]) -> None:
        self._device = device
        self._core = SubscriberCore(device._views, result, fds)
        self.id, self.name = self._core.id, self._core.name
        self.size, self.slots = self._core.pool.size, self._core.pool.slots
        self.start: int = result["start"]
        self._current: Frame | None = None
        device._syncs.add(self)

    def receive(self, timeout: float | None = None) -> Opening[Frame]:
        """The next frame (ETIME after ``timeout``; ESRCH once the publisher is gone and all is read)."""
        return Opening(lambda: self._receive(timeout))

    async def _receive(self, timeout: float | None) -> Frame:
        core = self._core
        status = core.status()
        if status:
            await trio.lowlevel.checkpoint()
        else:
            status = await _wait_frame(core, timeout)
        if status < 0:
            raise core.failed(status)
        return Frame(core)

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Frame:
        """The next frame; the one before is given back first. Ends with the stream."""
        if self._current is not None:
            self._current.release()
            self._current = None
        try:
            self._current = await self._receive(None)
        except BrokerError as e:
            if e.errno == errno.ESRCH:
                raise StopAsyncIteration from None
            raise
        return self._current

    async def close(self) -> None:
        """Leave: the publisher stops waiting for this subscriber at once."""
        if not self._core.closed and not self._device.closed:
            await self._device._settle(p.Unsubscribe(subscriber=self.id), self._close_local)
        else:
            self._close_local()

    def _close_local(self) -> None:
        if self._current is not None:
            self._current.release()  # the one ``async for`` handed out last
            self._current = None
        self._core.close_local()
        self._device._syncs.discard(self)


async def _wait_frame(core: SubscriberCore, timeout: float | None) -> int:
    """The next frame's status once it is not pending (ETIME after ``timeout``)."""
    view, point = core.frames, core.next
    hub = _hub()
    hub.epoll.watch(view)  # before the second look: a later signal cannot be missed
    with trio.move_on_after(math.inf if timeout is None else timeout):
        while not (status := view.status(point)):
            await _wake_up(hub, [view.eventfd])
        return status
    raise core.timed_out(timeout)


class Frame(FrameBase, AsyncClosing):
    """A received frame (``async with sub.receive() as frame``); leaving the block gives it back."""

    async def close(self) -> None:
        self.release()
        await trio.lowlevel.checkpoint()
