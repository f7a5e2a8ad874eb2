"""What the synchronisation model asks of the world: the server's I/O, and the fd store.

``Sync`` (in ``_sync``) is plain bookkeeping. Watching eventfds, waking waiters, signalling
fence descriptors and closing pages are the server's (``_watch.TimelineWatch``); keeping
timelines across a restart is the fd store's (``_fdstore_timelines.TimelineStore``). A state
with neither (the tests of the model, a broker before it serves) uses the quiet defaults here.
"""

from __future__ import annotations

from typing import Protocol

from ._records import Fence, Key, Timeline

__all__ = ["QuietHooks", "SyncHooks", "SyncObserver"]


class SyncHooks(Protocol):
    def watch(self, timeline: Timeline, on: bool) -> None: ...

    def kick(self, timeline: Timeline) -> None: ...

    def fence_done(self, fence: Fence) -> None: ...

    def deadline(self, when: float) -> None: ...

    def freed(self, timeline: Timeline) -> None: ...


class SyncObserver:
    """Told of the timelines and handles that outlive a connection; the fd store keeps them."""

    def timeline_added(self, timeline: Timeline) -> None:
        pass

    def timeline_removed(self, timeline: Timeline) -> None:
        pass

    def handle_added(self, timeline: Timeline, key: Key) -> None:
        pass

    def handle_removed(self, timeline: Timeline, key: Key) -> None:
        pass


class QuietHooks:
    """The hooks of a state with no server behind it: nothing is watched or woken."""

    def watch(self, timeline: Timeline, on: bool) -> None:
        pass

    def kick(self, timeline: Timeline) -> None:
        pass

    def fence_done(self, fence: Fence) -> None:
        pass

    def deadline(self, when: float) -> None:
        pass

    def freed(self, timeline: Timeline) -> None:
        timeline.page.close()
