"""Timelines and fences for the blocking client: the broker calls; waits are local."""

from __future__ import annotations

from .. import protocol as p
from ..protocol import timeline as page
from ._core import take_one_fd
from ._timeline import FenceBase, TimelineBase, blocking_wait

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

    from ._sync import Device

__all__ = ["Fence", "Timeline"]


class Timeline(TimelineBase):
    """A timeline this device holds; made by ``dev.timeline()`` or ``dev.import_timeline(fd)``."""

    def __init__(self, device: Device, desc: dict[str, Any], fds: list[int]) -> None:
        super().__init__(device._views, desc, fds)
        self._device = device
        device._syncs.add(self)

    def wait(self, point: int, *, timeout: float | None = None) -> None:
        """Until ``point`` is reached (no broker message); its error if it failed; ETIME on timeout."""
        view = self._view
        if page.point_status(view.slots, point) > 0:  # reached already: one look at the page
            return
        blocking_wait(((view, point),), timeout)

    def fence(self, point: int) -> Fence:
        """A fence for ``point``: the signaller's promises it (max_fence_time starts)."""
        result, fds = self._device._call(p.MakeFence(timeline=self.id, point=point))
        return Fence(self._device, take_one_fd(fds[:1]), result, fds[1:])

    def share(self) -> int:
        """A new handle to this timeline, the caller's to send and close."""
        return take_one_fd(self._device._call(p.ShareTimeline(timeline=self.id))[1])

    def close(self) -> None:
        """Let the timeline go (the broker frees it once nothing holds it)."""
        if not self.closed and not self._device.closed:
            self._device._call(p.ReleaseTimeline(timeline=self.id))
        self._close_local()
        self._device._syncs.discard(self)

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Fence(FenceBase):
    """A sync_file: ``fileno()`` turns readable, for good, once every point is reached."""

    def __init__(self, device: Device, fd: int, result: dict[str, Any], fds: list[int]) -> None:
        super().__init__(device._views, fd, result, fds)
        self._device = device
        device._syncs.add(self)

    def wait(self, timeout: float | None = None) -> None:
        """Until every point is reached (no broker message); a point's error; ETIME on timeout."""
        blocking_wait(self._points, timeout)

    def close(self) -> None:
        self.close_local()
        self._device._syncs.discard(self)

    def __enter__(self) -> Fence:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
