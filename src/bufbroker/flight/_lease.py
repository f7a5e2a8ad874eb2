"""A served buffer's mapping, held exactly as long as gRPC holds the bytes.

The service wraps its mapping in an Arrow buffer whose *base* is a ``Lease``: every batch it
sends is a slice of that buffer, and gRPC keeps each slice until the bytes are on the socket.
When the last reference goes (the stream finished, the client cancelled, the connection
dropped), Python frees the lease and the lease closes the transfer's own broker connection,
which unmaps, detaches and releases everything at once, as for any client that goes away. The
lease is the one owner of that connection, so nothing can close it while bytes are in flight.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pyarrow as pa

from ..client import Device
from ..protocol import BrokerError

__all__ = ["Lease"]


class Lease:
    """Owns a transfer's broker connection and a view of its mapping; see the module docstring."""

    def __init__(self, device: Device, view: memoryview, slot: threading.Semaphore) -> None:
        self._device: Device | None = device
        self._view: memoryview | None = view
        self._slot = slot
        self._wrapped: pa.Buffer | None = pa.py_buffer(view)

    def buffer(self) -> pa.Buffer:
        """The mapping as an Arrow buffer that keeps this lease alive (no copy)."""
        assert self._wrapped is not None
        return pa.foreign_buffer(self._wrapped.address, self._wrapped.size, base=self)

    def release(self) -> None:
        """Unmap and let go of the broker connection; idempotent."""
        device, self._device = self._device, None
        if device is None:
            return
        self._wrapped = None  # its export of the view goes first, then the view's of the mmap
        view, self._view = self._view, None
        if view is not None:
            with contextlib.suppress(BufferError):
                view.release()
        self._slot.release()  # first: once the broker sees the connection go, the slot is free
        with contextlib.suppress(BrokerError, OSError):
            device.close()

    def __del__(self, *_: Any) -> None:
        self.release()
