"""The trio client: ``open_device`` and the same objects as the blocking client, async.

Importing this module imports trio; ``bufbroker`` and ``bufbroker.client`` do not.
"""

from ._trio import (
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
    open_device,
    recv_handle,
    send_handle,
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
    "open_device",
    "recv_handle",
    "send_handle",
]
