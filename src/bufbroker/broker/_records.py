"""The broker's records: what exists, who holds it. Plain data; ``State`` enforces the rules.

A buffer lives while any handle to it is open anywhere, or any device holds a reference
(from allocate, open or import). Attachments and cpu accesses are only possible while the
device holds a reference, and a reference cannot be dropped while they exist (EBUSY), so
"holders empty and handles empty" is the whole liveness test.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..protocol import Access, Constraints, Direction
from ._heap import Backing
from ._layout import Layout
from ._timeline_page import TimelinePage

__all__ = [
    "Attachment",
    "Buffer",
    "Device",
    "Fence",
    "Handle",
    "Key",
    "PendingCall",
    "Ref",
    "Reserved",
    "Timeline",
    "TimelineRef",
    "Usage",
    "Wait",
]

Key = int
"""A handle's identity: the SO_COOKIE of the client end of its socketpair (64 bits, never reused).

Not its inode number: those come from a 32-bit counter that wraps, and a socket made later
could then pass for the handle.
"""


@dataclass(eq=False, slots=True, kw_only=True)
class Device:
    """One client connection (``struct device``), identified by the peer's credentials."""

    id: int
    name: str
    pid: int
    uid: int
    gid: int
    command: str
    constraints: Constraints
    connected: float
    refs: dict[int, Ref] = field(default_factory=dict)  # by buffer id
    attachments: dict[int, Attachment] = field(default_factory=dict)  # by attachment id
    cpu: Counter[tuple[int, Access]] = field(default_factory=Counter)  # (buffer id, mode)
    timelines: dict[int, TimelineRef] = field(default_factory=dict)  # held, by timeline id
    exporter: bool = False  # said so at hello: it may export buffers and is sent their calls
    calls: dict[int, PendingCall] = field(default_factory=dict)  # forwarded to it, unanswered
    streams: set[int] = field(default_factory=set)  # published, by stream id
    subscriptions: set[int] = field(default_factory=set)  # by subscriber id

    @property
    def label(self) -> str:
        return f"{self.name!r} (device {self.id}, pid {self.pid})"


@dataclass(eq=False, slots=True, kw_only=True)
class Ref:
    """A device's hold on a buffer; ``count`` imports of it, writable if any one was."""

    buffer: Buffer
    count: int = 1
    writable: bool = True


@dataclass(eq=False, slots=True, kw_only=True)
class Attachment:
    """``struct dma_buf_attachment``: a device linked to a buffer, with its constraints."""

    id: int
    device: Device
    buffer: Buffer
    direction: Direction | None = None  # None while unmapped
    map_count: int = 0
    dynamic: bool = False  # told of moves instead of pinning (dma_buf_attach_ops.move_notify)
    stale: int = 0  # mappings of memory the exporter has since moved away from, not yet unmapped


@dataclass(eq=False, slots=True, kw_only=True)
class Handle:
    key: Key
    buffer: Buffer
    readonly: bool
    uid: int  # charged for it: the uid of the device it was minted for


@dataclass(eq=False, slots=True, kw_only=True)
class Buffer:
    """A buffer. ``size`` is what was asked for; ``span``, its backing's length, whole pages."""

    id: int
    size: int
    span: int
    heap: str
    owner: int  # uid charged for it
    exporter: tuple[int, str, int]  # (device id, name, pid) at export time
    created: float
    name: str | None = None
    handles: dict[Key, Handle] = field(default_factory=dict)
    holders: dict[int, Device] = field(default_factory=dict)  # by device id
    attachments: dict[int, Attachment] = field(default_factory=dict)
    attached: dict[int, int] | None = None  # attachments per device id (made at the first attach)
    cpu: Counter[tuple[int, Access]] = field(default_factory=Counter)  # (device id, mode)
    layout: Layout | None = None  # chosen at the first map or cpu access
    backing: Backing | None = None  # exists from export for adopted memfds, else with layout
    reservation: list[Reserved] = field(default_factory=list)  # dma_resv: points to wait for
    remote: Device | None = None  # the exporter that supplies its memory and answers its ops
    revoked: bool = False  # its exporter is gone or revoked it: no new attach, map, cpu access
    moving: int = 0  # moves under way (waiting for dynamic importers to let go of old memory)
    sealable: bool = False  # allocated sealable: its memfd can take F_SEAL_FUTURE_WRITE / F_SEAL_WRITE
    sealing: bool = False  # seal asked for: no new writable mapping, whatever the kernel says yet
    sealed: bool = False  # F_SEAL_FUTURE_WRITE is set
    immutable: bool = False  # F_SEAL_WRITE is set: the kernel proves nobody can write it
    kept: bool = False  # held by the broker itself for a while (shm buffers adopted at start)

    @property
    def alive(self) -> bool:
        return bool(self.handles or self.holders or self.kept)


@dataclass(eq=False, slots=True, kw_only=True)
class PendingCall:
    """A call forwarded to an exporter whose answer the broker still waits for."""

    id: int
    op: str
    exporter: Device
    importer: Device
    buffer: Buffer
    started: float


@dataclass(slots=True)
class Usage:
    """What one uid holds, against its quotas."""

    connections: int = 0
    incomplete: int = 0  # connections that have not said hello yet
    buffers: int = 0
    bytes: int = 0
    handles: int = 0
    waiting: int = 0  # opens waiting for a name
    timelines: int = 0
    fences: int = 0
    streams: int = 0
    subscriptions: int = 0


@dataclass(eq=False, slots=True, kw_only=True)
class Wait:
    """Something waiting for a set of timeline points: a fence, or a parked cpu access.

    ``pending`` counts the points not yet reached; the first failed point's ``-errno`` is
    kept in ``status`` (sync_file's status), and ``done`` runs once, when ``pending`` is 0.
    """

    pending: int
    done: Callable[[Wait], None]
    status: int = 0  # 0 pending, 1 signalled, -errno failed


@dataclass(eq=False, slots=True, kw_only=True)
class Timeline:
    """drm_syncobj's timeline: one signaller (its maker), a page and an eventfd (``page``)."""

    id: int
    name: str | None
    owner: int  # uid charged for it
    signaller: tuple[int, str, int]  # (device id, name, pid) of its maker
    created: float
    page: TimelinePage
    live: Device | None  # the signaller while its device lives and holds the timeline
    handles: dict[Key, int] = field(default_factory=dict)  # the uid each is charged to
    holders: dict[int, TimelineRef] = field(default_factory=dict)  # by device id
    refs: int = 0  # fences and reservation entries that name it
    waits: list[tuple[int, int, Wait]] = field(default_factory=list)  # heap of (point, seq, wait)
    promises: deque[tuple[float, int]] = field(default_factory=deque)  # (deadline, point), both rising

    @property
    def alive(self) -> bool:
        return bool(self.handles or self.holders or self.refs)


@dataclass(eq=False, slots=True, kw_only=True)
class TimelineRef:
    timeline: Timeline
    count: int = 1


@dataclass(eq=False, slots=True, kw_only=True)
class Fence:
    """A sync_file: one descriptor (a socketpair end) for a set of points, one per timeline."""

    key: Key
    owner: int  # uid charged for it
    points: dict[int, tuple[Timeline, int]]  # by timeline id
    created: float
    wait: Wait


@dataclass(eq=False, slots=True, kw_only=True)
class Reserved:
    """One point in a buffer's reservation (dma_resv): a writer's or a reader's."""

    timeline: Timeline
    point: int
    write: bool
