"""The client library: the blocking client here, the trio twin in ``bufbroker.client.trio``."""

from ._exporting import Exporter, ExporterAttachment
from ._passing import recv_handle, send_handle
from ._sync import Attachment, Buffer, CpuAccess, Device, Mapping, connect

__all__ = [
    "Attachment",
    "Buffer",
    "CpuAccess",
    "Device",
    "Exporter",
    "ExporterAttachment",
    "Mapping",
    "connect",
    "recv_handle",
    "send_handle",
]
