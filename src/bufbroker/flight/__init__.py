"""Buffers between hosts over Apache Arrow Flight (the ``flight`` extra; this imports pyarrow).

Each host runs its broker and one Flight service (``bufbroker-flight``), a client of that
broker. The service serves named buffers straight from its mappings and lands uploads in new
buffers; ``fetch`` and ``push`` are the other end. What crosses hosts is a copy of the bytes,
taken as they were while they were read: see docs/SCALING.md.
"""

from ._client import Progress, drop, fetch, push
from ._policy import Policy
from ._server import FlightService
from ._wire import CHUNK

__all__ = ["CHUNK", "FlightService", "Policy", "Progress", "drop", "fetch", "push"]
