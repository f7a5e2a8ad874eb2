"""Calls from the broker to an exporter, and what an exporter may answer: one schema place.

An exporter is a device that said ``exporter: true`` in its hello; it supplies the memory of
the buffers it made with ``export`` and answers their ops, as a driver's ``dma_buf_ops`` do.
The broker forwards an importer's attach, map and cpu access to it as a *call* and waits
(bounded) for its *answer*; teardown (detach, unmap, end of cpu access, release) is a
*notice*: a call without an id, sent once the importer's request has been applied, never
answered. Calls travel as their own message kinds (``_messages``), so a client that did not
ask to export never receives one.

A map or cpu access is answered ``{"segments": [[0, offset, length], ...]}`` (or ``{}``, for
one layout the broker chooses) with exactly one memfd; attach is answered ``{}``; any call may
be refused with an error. Answers are untrusted: the broker checks them (broker/_answers.py)
and any breach is ``EIO`` for the importer, since the exporter lied, not the importer.
"""

from __future__ import annotations

from ._ops import OpArgs, OpSpec, op, parse_args
from ._types import Access, Constraints, Direction

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "CALLS",
    "AttachCall",
    "BeginCpuCall",
    "DetachCall",
    "EndCpuCall",
    "MapCall",
    "ReleaseCall",
    "UnmapCall",
    "parse_call",
]

CALLS: dict[str, OpSpec] = {}


@op("attach", registry=CALLS)
class AttachCall(OpArgs):
    """``dma_buf_ops.attach``: may refuse (its errno reaches the importer)."""

    buffer: int
    attachment: int
    device: str  # the importer's device name
    pid: int
    constraints: Constraints = Constraints()
    dynamic: bool = False


@op("detach", registry=CALLS)
class DetachCall(OpArgs):
    buffer: int
    attachment: int


@op("map", registry=CALLS)
class MapCall(OpArgs):
    """``map_dma_buf``: answered with one memfd and, optionally, its scatter list."""

    buffer: int
    attachment: int
    direction: Direction


@op("unmap", registry=CALLS)
class UnmapCall(OpArgs):
    buffer: int
    attachment: int


@op("begin_cpu_access", registry=CALLS)
class BeginCpuCall(OpArgs):
    """``begin_cpu_access``: answered like map, with the memory the cpu is to see."""

    buffer: int
    access: Access


@op("end_cpu_access", registry=CALLS)
class EndCpuCall(OpArgs):
    buffer: int
    access: Access


@op("release", registry=CALLS)
class ReleaseCall(OpArgs):
    """``dma_buf_ops.release``: the last reference anywhere is gone."""

    buffer: int


def parse_call(name: str, args: Any) -> OpArgs:
    """An exporter's view of a call's ``args`` (the client side decodes with it)."""
    return parse_args(name, args, 0, CALLS)
