"""Whether a device may attach to a buffer, given the layout it has or will have.

dma-buf's rules for an exporter that collates its importers' constraints: before the buffer
has memory, no layout for everyone attached → EINVAL, naming whom this device conflicts with;
after, a layout this device cannot address → EBUSY; and a layout too long for one map reply
is refused here, before anything is fixed (EMSGSIZE). Plain arithmetic over records.
"""

from __future__ import annotations

import errno

from ..protocol import BrokerError
from ._layout import combine, plan
from ._records import Buffer, Device

__all__ = ["check_fits", "check_length"]


def check_length(buffer: Buffer, device: Device, others: list[Device], limit: int) -> None:
    """A layout too long for one map reply is refused here, before anything is fixed."""
    if buffer.layout is not None:
        return
    wanted = combine([device.constraints, *(d.constraints for d in others)])
    layout = plan(buffer.size, wanted)
    if layout is not None and layout.count > limit:
        raise BrokerError(
            errno.EMSGSIZE,
            f"the layout would have {layout.count} segments, more than max_layout_segments "
            f"({limit}): allow longer segments (max_segment_size)",
        )


def check_fits(buffer: Buffer, device: Device, attached: list[Device]) -> None:
    mine = device.constraints
    if buffer.layout is not None:
        if not buffer.layout.satisfies(mine):
            raise BrokerError(
                errno.EBUSY,
                f"buffer {buffer.id} is already laid out in {buffer.layout.count} segment(s) "
                f"that {device.label} cannot address",
            )
        return
    if plan(buffer.size, mine) is None:
        raise BrokerError(
            errno.EINVAL,
            f"{device.label} cannot address {buffer.size} bytes with its own constraints",
        )
    others = {d.id: d for d in attached}
    for other in others.values():
        if plan(buffer.size, combine([mine, other.constraints])) is None:
            raise BrokerError(
                errno.EINVAL,
                f"{device.label} conflicts with attached device {other.label}: no layout "
                f"of {buffer.size} bytes meets both",
            )
    everyone = [mine, *(d.constraints for d in others.values())]
    if plan(buffer.size, combine(everyone)) is None:
        names = ", ".join(d.label for d in others.values())
        raise BrokerError(
            errno.EINVAL,
            f"{device.label} conflicts with the attached devices {names} taken together",
        )
