"""Freeing large backings off the event loop.

The close() that drops a memfd's last reference frees its pages inside that system call, at
about 100 ms per GiB on these machines. In the event loop that stalls every client: releasing
a 1 GiB buffer held other clients' pings up for 107 ms. The kernel's dma-buf frees from its
own last ``fput``, in the releasing task or a workqueue, never in a shared server loop. Here a
backing of LARGE bytes or more is closed in a worker thread (``os.close`` lets go of the GIL);
a smaller one at once, where a trip to a thread would cost more than the close.
"""

from __future__ import annotations

import math

import trio

from ._heap import Backing

__all__ = ["LARGE", "Reaper"]

LARGE = 16 << 20  # 1.3 ms to free with every page written, measured here; a thread trip: 0.2 ms


class Reaper:
    """Closes the backings of freed buffers: large ones in a thread, one after another."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Backing](math.inf)

    def free(self, backing: Backing) -> None:
        """Close ``backing`` now, or queue it for ``run`` if closing it could take long."""
        if backing.size < LARGE:
            backing.close()
        else:
            self._send.send_nowait(backing)

    async def run(self) -> None:
        async for backing in self._receive:
            with trio.CancelScope(shield=True):  # taken off the queue: closed, whatever happens
                await trio.to_thread.run_sync(backing.close)

    def close(self) -> None:
        """Close whatever is still queued, here and now (the broker is stopping)."""
        while True:
            try:
                self._receive.receive_nowait().close()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
