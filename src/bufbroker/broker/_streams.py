"""Streams: the registry of publishers, their pools and their subscribers, with no I/O.

Theory of operation. A stream is a swapchain: a pool of ``slots`` frame slots (one sealed
memfd, its first page the control page, see ``protocol/_stream.py``), a frame timeline that
the publisher signals with each frame's sequence number, and one release timeline per
subscriber that the subscriber signals with the last frame it gave back. Frames move with no
broker message: the broker only answers joins and departures, so it keeps

* each stream by its owner's uid and name (names of other uids are not visible), charged to
  that uid as a stream and its pool as a buffer of the pool's size;
* each subscriber: its device, its release timeline and the first frame it receives (the one
  after the latest sent when it joined); a join or a departure bumps the control page's
  ``members`` word, which the publisher looks at before each loan;
* that every wait ends: a subscriber that leaves or dies has its release timeline failed
  with ESRCH (so the publisher stops waiting for it), and a publisher that leaves or dies has
  the frame timeline failed with ESRCH from the next frame on (so subscribers receive what
  was sent, then ESRCH).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol import BrokerError
from ..protocol import stream as control_page
from ._config import Config
from ._heap import Backing
from ._quota import Quotas
from ._records import Device, Timeline
from ._sync import Sync
from ._timeline_page import TimelinePage

__all__ = ["Control", "Stream", "Streams", "Subscriber"]


class Control(Protocol):
    """The broker's mapping of a pool's control page."""

    words: control_page.Control

    def close(self) -> None: ...


@dataclass(eq=False, slots=True, kw_only=True)
class Subscriber:
    id: int
    stream: Stream
    device: Device
    release: Timeline
    start: int  # the first frame it receives
    joined: float


@dataclass(eq=False, slots=True, kw_only=True)
class Stream:
    id: int
    name: str
    owner: int  # uid charged for it
    publisher: Device
    size: int
    slots: int
    backing: Backing  # the pool: control page, then the slots
    control: Control
    frames: Timeline
    created: float
    subscribers: dict[int, Subscriber] = field(default_factory=dict)
    ended: bool = False

    @property
    def sent(self) -> int:
        return self.frames.page.value

    def position(self, sub: Subscriber) -> int:
        """The last frame ``sub`` gave back (or the one before it joined at)."""
        return max(sub.release.page.value, sub.start - 1)

    @property
    def in_use(self) -> int:
        """Slots holding a frame that some subscriber has not given back."""
        if not self.subscribers:
            return 0
        oldest = min(self.position(s) for s in self.subscribers.values())
        return min(self.slots, self.sent - oldest)


class Streams:
    def __init__(
        self,
        config: Config,
        quotas: Quotas,
        sync: Sync,
        ids: Callable[[str], int],
        clock: Callable[[], float],
        free: Callable[[Backing], None],
    ) -> None:
        self.config = config
        self.quotas = quotas
        self.sync = sync
        self._ids = ids
        self._clock = clock
        self._free = free
        self.streams: dict[int, Stream] = {}  # insertion order is id order
        self.names: dict[tuple[int, str], Stream] = {}  # by (owner uid, name)
        self.subscribers: dict[int, Subscriber] = {}

    @staticmethod
    def pool_bytes(size: int, slots: int) -> int:
        return control_page.PAGE_BYTES + slots * control_page.stride_for(size)

    def check_publish(self, device: Device, name: str, size: int, slots: int) -> int:
        """The pool's size for ``publish``, or the errno it would get: nothing is held yet."""
        if not name:
            raise BrokerError(errno.EINVAL, "a stream needs a name")
        if not size:
            raise BrokerError(errno.EINVAL, "frames must be at least 1 byte")
        if not 0 < slots <= control_page.MAX_SLOTS:
            raise BrokerError(errno.EINVAL, f"a stream has 1 to {control_page.MAX_SLOTS} slots")
        if (device.uid, name) in self.names:
            raise BrokerError(errno.EEXIST, f"this uid already publishes a stream named {name!r}")
        usage, limit = self.quotas.of(device.uid), self.config.max_streams_per_uid
        if usage.streams >= limit:
            raise BrokerError(
                errno.EDQUOT,
                f"uid {device.uid} publishes {usage.streams} streams (max_streams_per_uid={limit})",
            )
        pool = self.pool_bytes(size, slots)
        self.quotas.check(device.uid, pool)
        return pool

    def publish(
        self,
        device: Device,
        name: str,
        size: int,
        slots: int,
        backing: Backing,
        control: Control,
        page: TimelinePage,
    ) -> Stream:
        """A stream published by ``device``; takes ``backing``, ``control`` and ``page``."""
        try:
            self.check_publish(device, name, size, slots)
            frames = self.sync.make_timeline(device, name, page)
        except BrokerError:
            control.close()
            self._free(backing)
            raise
        self.quotas.charge(device.uid, backing.size)
        self.quotas.charge_object(device.uid, "streams")
        stream = Stream(
            id=self._ids("stream"),
            name=name,
            owner=device.uid,
            publisher=device,
            size=size,
            slots=slots,
            backing=backing,
            control=control,
            frames=frames,
            created=self._clock(),
        )
        self.streams[stream.id] = stream
        self.names[(device.uid, name)] = stream
        device.streams.add(stream.id)
        return stream

    def find(self, device: Device, name: str) -> Stream:
        """The stream ``name`` of the caller's uid: names of other uids are ENOENT, as missing ones."""
        stream = self.names.get((device.uid, name))
        if stream is None:
            raise BrokerError(errno.ENOENT, f"no stream is named {name!r}")
        return stream

    def published(self, device: Device, stream_id: int) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.publisher is not device:
            raise BrokerError(errno.EBADF, f"stream {stream_id} is not published by this device")
        return stream

    def check_subscribe(self, device: Device, stream: Stream) -> None:
        limit = self.config.max_subscribers_per_stream
        if len(stream.subscribers) >= limit:
            raise BrokerError(
                errno.EUSERS,
                f"stream {stream.name!r} has {limit} subscribers (max_subscribers_per_stream)",
            )
        usage, most = self.quotas.of(device.uid), self.config.max_subscriptions_per_uid
        if usage.subscriptions >= most:
            raise BrokerError(
                errno.EDQUOT,
                f"uid {device.uid} holds {usage.subscriptions} subscriptions "
                f"(max_subscriptions_per_uid={most})",
            )

    def subscribe(self, device: Device, stream: Stream, page: TimelinePage) -> Subscriber:
        """``device`` joins at the frame after the latest sent; takes ``page`` (its release timeline)."""
        try:
            self.check_subscribe(device, stream)
        except BrokerError:
            page.close()
            raise
        release = self.sync.make_timeline(device, stream.name, page)  # EDQUOT closes the page
        self.quotas.charge_object(device.uid, "subscriptions")
        self.sync.hold(device, stream.frames)
        sub = Subscriber(
            id=self._ids("subscriber"),
            stream=stream,
            device=device,
            release=release,
            start=stream.sent + 1,
            joined=self._clock(),
        )
        self.subscribers[sub.id] = sub
        stream.subscribers[sub.id] = sub
        device.subscriptions.add(sub.id)
        control_page.bump_members(stream.control.words)
        return sub

    def leave(self, device: Device, subscriber_id: int) -> None:
        """The subscriber goes: its release timeline fails with ESRCH, the publisher stops waiting."""
        sub = self.subscribers.get(subscriber_id)
        if sub is None or sub.device is not device:
            raise BrokerError(errno.EBADF, f"subscriber {subscriber_id} is not this device's")
        del self.subscribers[sub.id]
        device.subscriptions.discard(sub.id)
        stream = sub.stream
        if stream.subscribers.pop(sub.id, None) is not None:
            control_page.bump_members(stream.control.words)
        self.sync.fail(sub.release, errno.ESRCH)
        self.sync.release_timeline(device, sub.release.id)
        self.sync.release_timeline(device, stream.frames.id)
        self.quotas.uncharge_object(device.uid, "subscriptions")

    def end(self, device: Device, stream_id: int) -> None:
        """The publisher goes: frames not sent fail with ESRCH; the name and the pool are freed."""
        stream = self.published(device, stream_id)
        stream.ended = True
        del self.streams[stream.id]
        del self.names[(stream.owner, stream.name)]
        device.streams.discard(stream.id)
        stream.subscribers.clear()  # each still holds its release timeline until it leaves
        self.sync.fail(stream.frames, errno.ESRCH)
        self.sync.release_timeline(device, stream.frames.id)
        self.quotas.uncharge(stream.owner, stream.backing.size)
        self.quotas.uncharge_object(stream.owner, "streams")
        stream.control.close()
        self._free(stream.backing)

    def device_gone(self, device: Device) -> None:
        for sub_id in list(device.subscriptions):
            self.leave(device, sub_id)
        for stream_id in list(device.streams):
            self.end(device, stream_id)

    def members(self, device: Device, stream_id: int) -> list[Subscriber]:
        return list(self.published(device, stream_id).subscribers.values())
