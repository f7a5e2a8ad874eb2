"""The client library: the blocking client here, the trio twin in ``bufbroker.client.trio``."""

from ._passing import recv_handle, send_handle
from ._sync import (
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
)

__all__ = [
    "Attachment",
    "Buffer",
    "CpuAccess",
    "Device",
    "Fence",
    "Frame",
    "Loan",
    "Mapping",
    "Publisher",
    "Subscriber",
    "Timeline",
    "connect",
    "recv_handle",
    "send_handle",
]
