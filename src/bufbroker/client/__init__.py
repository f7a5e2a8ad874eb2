"""The client library: the blocking client here, the trio twin in ``bufbroker.client.trio``."""

from __future__ import annotations

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

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

    from ._exporting import Exporter, ExporterAttachment

__all__ = [
    "Attachment",
    "Buffer",
    "CpuAccess",
    "Device",
    "Exporter",
    "ExporterAttachment",
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


def __getattr__(name: str) -> Any:
    # Exporters are few: other programs, the CLI among them, do not import their module.
    if name in ("Exporter", "ExporterAttachment"):
        from . import _exporting

        return getattr(_exporting, name)
    raise AttributeError(f"module 'bufbroker.client' has no attribute {name!r}")
