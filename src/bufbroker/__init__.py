"""bufbroker: a userspace dma-buf.

``bufbroker.connect`` is the blocking client (it never imports trio); ``bufbroker.open_device``
is its trio twin and is imported only when first used.
"""

from __future__ import annotations

from .client import (
    Attachment,
    Buffer,
    CpuAccess,
    Device,
    Fence,
    Frame,
    Loan,
    Mapping,
    Publisher,
    Subscriber,
    Timeline,
    connect,
    recv_handle,
    send_handle,
)
from .protocol import Access, BrokerError, BrokerUnavailable, Constraints, Direction, ProtocolError, Segment

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

    from .client import Exporter, ExporterAttachment

__version__ = "0.1.0"

__all__ = [
    "Access",
    "Attachment",
    "BrokerError",
    "BrokerUnavailable",
    "Buffer",
    "Constraints",
    "CpuAccess",
    "Device",
    "Direction",
    "Exporter",
    "ExporterAttachment",
    "Fence",
    "Frame",
    "Loan",
    "Mapping",
    "ProtocolError",
    "Publisher",
    "Segment",
    "Subscriber",
    "Timeline",
    "__version__",
    "connect",
    "open_device",
    "recv_handle",
    "send_handle",
]


def __getattr__(name: str) -> Any:
    # The trio client costs trio's import time; only programs that use it pay.
    if name == "open_device":
        from .client.trio import open_device

        return open_device
    if name in ("Exporter", "ExporterAttachment"):  # only exporters pay for their module
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'bufbroker' has no attribute {name!r}")
