"""The trio client's side of exporting and of dynamic attachments: one task in its nursery.

The reader task hands every call and event here (``dispatch``); one serving task runs them
in the order they came, so that an exporter sees an unmap before the map that follows it, as
the blocking client's server thread does. Exporter methods and ``on_move`` callbacks may be
plain functions or coroutines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from .. import protocol as p
from ._exporting import CallServer

if TYPE_CHECKING:
    from ._trio import Device

__all__ = ["dispatch"]

log = logging.getLogger("bufbroker.client")


def dispatch(device: Device, message: p.Call | p.Event) -> None:
    """Queue ``message`` for the device's serving task (started on the first one)."""
    if device._jobs is None:
        send, receive = trio.open_memory_channel[p.Call | p.Event](math.inf)
        device._jobs = send
        device._nursery.start_soon(_serve, device, receive)
    device._jobs.send_nowait(message)


async def _run(method: Any) -> tuple[Any, BaseException | None]:
    try:
        value = method()
        if CallServer.is_awaitable(value):
            value = await value
        return value, None
    except Exception as e:
        return None, e


async def _serve(device: Device, jobs: trio.MemoryReceiveChannel[p.Call | p.Event]) -> None:
    async for job in jobs:
        if isinstance(job, p.Event):
            if device._calls is not None:
                device._calls.event(job)
            callback = device._moves.callback(job)
            if callback is not None:
                _, error = await _run(callback)
                if error is not None:
                    log.error("an on_move callback failed", exc_info=error)
            continue
        if device._calls is None:
            continue  # not an exporter: the broker sends no calls
        value, error = await _run(device._calls.method(job))
        answer = CallServer.answer(job, value, error)
        if answer is not None:
            await _send(device, job, *answer)


async def _send(device: Device, call: p.Call, data: bytes, fds: list[int]) -> None:
    if device.closed:
        return
    try:
        try:
            device._raw.sendmsg([data], p.ancillary(fds))
        except BlockingIOError:
            async with device._send_lock:
                await device._sock.sendmsg([data], p.ancillary(fds))
    except (OSError, ValueError, TypeError, OverflowError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EBADF, errno.EINVAL):
            return  # the connection is ending; the reader reports it
        with contextlib.suppress(OSError):
            device._raw.send(CallServer.failed(call, OSError(errno.EBADF, str(e))))
    except trio.ClosedResourceError:
        pass
