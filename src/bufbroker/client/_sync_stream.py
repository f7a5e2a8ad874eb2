"""Streams for the blocking client: joining and leaving ask the broker; frames do not."""

from __future__ import annotations

import errno
import time

from .. import protocol as p
from ..protocol import BrokerError
from ._stream import FrameBase, LoanBase, PublisherCore, SubscriberCore
from ._timeline import View, thread_epoll

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from ._sync import Device

__all__ = ["Frame", "Loan", "Publisher", "Subscriber"]


class Publisher:
    """A stream this device publishes: ``loan()`` a slot, fill it, ``send(nbytes)``."""

    def __init__(self, device: Device, result: dict[str, Any], fds: list[int]) -> None:
        self._device = device
        self._core = PublisherCore(device._views, result, fds)
        self.id, self.name = self._core.id, self._core.name
        self.size, self.slots = self._core.size, self._core.slots
        device._syncs.add(self)

    @property
    def subscribers(self) -> int:
        """Subscribers as of the latest loan."""
        return self._core.subscribers

    @property
    def sent(self) -> int:
        """Frames sent so far (the latest frame's ``seq``)."""
        return self._core.seq - 1

    def loan(self, timeout: float | None = None) -> Loan:
        """The next slot, once every subscriber gave back the frame it held (ETIME after ``timeout``)."""
        core = self._core
        core.reserve()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if core.stale():
                    self._refresh()
                waiting = core.pending()
                if not waiting:
                    return Loan(core)
                _wait_any(waiting, deadline, core.pending, lambda: core.timed_out(timeout))
        except BaseException:
            core.loaned = False
            raise

    def _refresh(self) -> None:
        core = self._core
        try:
            request = core.members_request()
            while core.apply_members(*self._device._call(request)):
                request = core.members_request()
        except BaseException:
            core.invalidate()
            raise

    def close(self) -> None:
        """End the stream: subscribers receive what was sent, then ESRCH."""
        if not self._core.closed and not self._device.closed:
            self._device._call(p.Unpublish(stream=self.id))
        self._close_local()

    def _close_local(self) -> None:
        self._core.close_local()
        self._device._syncs.discard(self)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wait_any(
    views: list[View],
    deadline: float | None,
    pending: Callable[[], list[View]],
    timed_out: Callable[[], BrokerError],
) -> None:
    """Return once one of ``views`` may have moved (ETIME past ``deadline``)."""
    epoll = thread_epoll()
    for view in views:
        epoll.watch(view)  # before the second look: a signal after it cannot be missed
    if not pending():
        return
    left = -1.0 if deadline is None else deadline - time.monotonic()
    if deadline is not None and left <= 0:
        raise timed_out()
    epoll.epoll.poll(left, 64)


class Loan(LoanBase):
    """A slot on loan (``with pub.loan() as frame``): ``memory``, ``seq``, ``send(nbytes)``."""

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._finish()

    def discard(self) -> None:
        """Give the slot back unsent: no subscriber ever sees it."""
        self._finish()


class Subscriber:
    """A subscription: ``receive()`` the next frame; ``for frame in sub`` until the stream ends."""

    def __init__(self, device: Device, result: dict[str, Any], fds: list[int]) -> None:
        self._device = device
        self._core = SubscriberCore(device._views, result, fds)
        self.id, self.name = self._core.id, self._core.name
        self.size, self.slots = self._core.pool.size, self._core.pool.slots
        self.start: int = result["start"]
        device._syncs.add(self)

    def receive(self, timeout: float | None = None) -> Frame:
        """The next frame (ETIME after ``timeout``; ESRCH once the publisher is gone and all is read)."""
        core = self._core
        status = core.status() or _wait_frame(core, timeout)
        if status < 0:
            raise core.failed(status)
        return Frame(core)

    def __iter__(self) -> Iterator[Frame]:
        """Each frame in turn, given back when the next is asked for; ends with the stream."""
        while True:
            try:
                frame = self.receive()
            except BrokerError as e:
                if e.errno == errno.ESRCH:
                    return
                raise
            with frame:
                yield frame

    def close(self) -> None:
        """Leave: the publisher stops waiting for this subscriber at once."""
        if not self._core.closed and not self._device.closed:
            self._device._call(p.Unsubscribe(subscriber=self.id))
        self._close_local()

    def _close_local(self) -> None:
        self._core.close_local()
        self._device._syncs.discard(self)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wait_frame(core: SubscriberCore, timeout: float | None) -> int:
    """The next frame's status once it is not pending (ETIME after ``timeout``)."""
    view, point = core.frames, core.next
    epoll = thread_epoll()
    epoll.watch(view)  # before the second look: a later signal cannot be missed
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (status := view.status(point)):
        left = -1.0 if deadline is None else deadline - time.monotonic()
        if deadline is not None and left <= 0:
            raise core.timed_out(timeout)
        epoll.epoll.poll(left, 64)
    return status


class Frame(FrameBase):
    """A received frame (``with sub.receive() as frame``); leaving the block gives the slot back."""

    def __enter__(self) -> Frame:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
