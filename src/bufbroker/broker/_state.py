"""The broker's state model: dma-buf's rules over plain records, with no sockets and no trio.

The server calls one method per request and turns a raised ``BrokerError`` into an error reply;
every method either applies whole or raises before changing anything. Descriptors never pass
through here: handles are known by their inode key (the server mints and watches the sockets)
and backing storage comes from, and goes back to, the functions given to the constructor.

Where the rules leave a detail open we follow drivers/dma-buf/dma-buf.c, and docs/PROTOCOL.md
records it: a buffer id this device does not hold is EBADF (like a closed fd); a name already
taken by a live buffer of the same owner is EEXIST; an unknown heap is ENODEV; releasing a
buffer with cpu access still begun is EBUSY, as releasing one still attached is.

Names belong to the buffer's owner: each uid has a namespace of its own, so no uid can take,
shadow or even learn of another's names. ``open`` looks in the caller's namespace (root may
say whose), and a name found nowhere is ENOENT whoever else may have it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import protocol as p
from ..protocol import Access, BrokerError, Constraints, Direction
from ._config import Config
from ._exports import revoke_buffer
from ._fits import check_fits, check_length
from ._heap import Backing, allocate_memfd
from ._heaps import Heap, HugetlbHeap, MemfdHeap
from ._layout import Layout, combine, plan
from ._quota import Quotas
from ._records import Attachment, Buffer, Device, Handle, Key, Ref
from ._reserve import Reserve
from ._seal import Sealing
from ._streams import Streams
from ._sync import QuietHooks, Sync

__all__ = ["Mapped", "State"]


class Observer:
    """Told of every change that outlives a connection; the fd store persists them.

    The default does nothing: a broker with no service manager keeps nothing across restarts.
    """

    def handle_added(self, handle: Handle) -> None:
        pass

    def handle_removed(self, handle: Handle) -> None:
        pass

    def changed(self, buffer: Buffer) -> None:
        """A buffer was created, named, laid out or freed."""


@dataclass(frozen=True, slots=True)
class Mapped:
    """What a map or cpu access hands the client: the layout and the backing, RO or RW.

    ``size`` is the buffer's, which the client's memory has; the backing may be longer.
    """

    layout: Layout
    backing: Backing
    writable: bool
    size: int


class State(Sealing):
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        heaps: list[Heap] | None = None,
        free: Callable[[Backing], None] = Backing.close,
    ) -> None:
        self.config = config
        self.clock = clock
        self.heaps = {heap.name: heap for heap in heaps or [MemfdHeap(), HugetlbHeap()]}
        self.free = free  # a freed buffer's backing goes here (the server's frees large ones off its loop)
        self.started = clock()
        self.buffers: dict[int, Buffer] = {}  # insertion order is id order
        self.devices: dict[int, Device] = {}
        self.handles: dict[Key, Handle] = {}
        self.names: dict[tuple[int, str], Buffer] = {}  # by (owner uid, name)
        self.quotas = Quotas(config)
        self.reserve = Reserve(config.fd_reserve)
        self._next_ids: dict[str, int] = {}
        self.observer = Observer()
        self.sync = Sync(config, self.quotas, self.new_id, clock, time.monotonic, QuietHooks())
        # Messages for a device outside its request's reply: events, and notices to exporters
        # (the server queues them on the device's connection), and a word that a moved
        # buffer's stale mapping went away (the server wakes the move waiting for it).
        self.post: Callable[[Device, p.Event | p.Call], None] = lambda device, message: None
        self.unmapped: Callable[[Buffer], None] = lambda buffer: None
        self.exporters = 0  # devices connected as exporters: without any, nothing is forwarded
        self.streams = Streams(config, self.quotas, self.sync, self.new_id, clock, lambda b: self.free(b))

    def reserve_id(self, kind: str, id: int) -> None:
        """An id kept across a restart: new ones of its kind come after it."""
        self._next_ids[kind] = max(self._next_ids.get(kind, 1), id + 1)

    def new_id(self, kind: str) -> int:
        """Ids count per kind (buffer 1, 2, ...; device 1, 2, ...) and are never reused."""
        id = self._next_ids.get(kind, 1)
        self._next_ids[kind] = id + 1
        return id

    # --- connections and devices ---------------------------------------------------------

    def admit(self, uid: int) -> None:
        self.quotas.admit(uid)

    def leave(self, uid: int) -> None:
        self.quotas.leave(uid)

    def add_device(
        self,
        *,
        name: str,
        pid: int,
        uid: int,
        gid: int,
        command: str,
        constraints: Constraints,
        exporter: bool = False,
    ) -> Device:
        device = Device(
            id=self.new_id("device"),
            name=name,
            pid=pid,
            uid=uid,
            gid=gid,
            command=command,
            constraints=constraints,
            connected=self.clock(),
            exporter=exporter,
        )
        self.devices[device.id] = device
        self.exporters += exporter
        return device

    def remove_device(self, device: Device) -> None:
        """Everything the device held goes, as when a process dies with its dma-buf fds.

        An exporter's buffers are revoked (docs/CONCEPTS.md): their holders keep what they
        have mapped, and get ENODEV for anything new.
        """
        if device.exporter:
            self.exporters -= 1
            for buffer in self.buffers.values():
                if buffer.remote is device:
                    revoke_buffer(self, buffer)
        self.streams.device_gone(device)
        touched = {att.buffer for att in device.attachments.values()}
        for att in list(device.attachments.values()):
            self._drop_attachment(att)
        for (buffer_id, access), count in device.cpu.items():
            buffer = self.buffers[buffer_id]
            touched.add(buffer)
            buffer.cpu.pop((device.id, access), None)
            for _ in range(count):
                self.tell(buffer, p.EndCpuCall(buffer=buffer_id, access=access))
        device.cpu.clear()
        for buffer in touched:
            self._maybe_unwritten(buffer)
        for ref in list(device.refs.values()):
            self._drop_ref(device, ref)
        self.sync.device_gone(device)
        del self.devices[device.id]

    # --- creating buffers ----------------------------------------------------------------

    def _check_name_free(self, owner: int, name: str | None, buffer: Buffer | None = None) -> None:
        if name and self.names.get((owner, name), buffer) is not buffer:
            raise BrokerError(errno.EEXIST, f"the name {name!r} belongs to another buffer")

    def create(
        self,
        device: Device,
        size: int,
        heap: str,
        name: str | None,
        backing: Backing | None,
        remote: Device | None = None,
        *,
        span: int | None = None,
        sealable: bool = False,
    ) -> Buffer:
        """A new buffer of ``size`` bytes; its backing takes ``span`` (``size`` unless given)."""
        span = size if span is None else span
        self.quotas.check(device.uid, span)
        self._check_name_free(device.uid, name)
        buffer = Buffer(
            id=self.new_id("buffer"),
            size=size,
            span=span,
            sealable=sealable,
            heap=heap,
            owner=device.uid,
            created=self.clock(),
            exporter=(device.id, device.name, device.pid),
            backing=backing,
            remote=remote,
        )
        self.buffers[buffer.id] = buffer
        self.quotas.charge(device.uid, span)
        self._set_name(buffer, name)
        self._add_ref(device, buffer, writable=True)
        return buffer

    def restore(
        self,
        *,
        id: int,
        size: int,
        span: int,
        owner: int,
        heap: str,
        name: str | None,
        exporter: tuple[int, str, int],
        created: float,
        backing: Backing | None,
        layout: Layout | None,
        sealable: bool = False,
    ) -> Buffer:
        """A buffer carried across a broker restart; only its handles hold it until imported.

        Quotas are charged but not checked: the buffer already existed within them. An
        exporter's buffer comes back revoked: its exporter's connection ended with the old
        broker, and its memory never was the broker's.
        """
        buffer = Buffer(
            id=id,
            size=size,
            span=span,
            sealable=sealable,
            heap=heap,
            owner=owner,
            created=created,
            exporter=exporter,
            backing=backing,
            layout=layout if backing is not None else None,
            revoked=heap == "exporter",
        )
        self.buffers = dict(sorted({**self.buffers, id: buffer}.items()))
        self._next_ids["buffer"] = max(self._next_ids.get("buffer", 1), id + 1)
        self.quotas.charge(owner, span)
        if name and (owner, name) not in self.names:
            self._set_name(buffer, name)
        return buffer

    def let_go(self, buffer: Buffer) -> None:
        """The broker's own hold on a buffer it adopted at start ends."""
        buffer.kept = False
        self._maybe_free(buffer)

    def allocate(
        self, device: Device, size: int, *, name: str | None, heap: str, sealable: bool = False
    ) -> Buffer:
        """``dma_heap_buffer_alloc``: a buffer with no backing yet (it comes at first map).

        The buffer keeps ``size``; its backing is rounded up to the heap's pages.
        """
        if size == 0:
            raise BrokerError(errno.EINVAL, "size must be at least 1 byte")
        allocator = self.heaps.get(heap)
        if allocator is None:
            raise BrokerError(errno.ENODEV, f"no heap {heap!r} (heaps: {', '.join(self.heaps)})")
        allocator.check()
        if sealable and not allocator.sealable:
            raise BrokerError(
                errno.EINVAL, f"the kernel cannot seal {heap} memory: allocate sealable buffers elsewhere"
            )
        return self.create(device, size, heap, name, None, span=allocator.span(size), sealable=sealable)

    def allocate_backing(self, size: int, label: str) -> Backing:
        """Memory from the default heap for something other than a buffer (a stream's pool)."""
        return allocate_memfd(size, label)

    def export(self, device: Device, backing: Backing, *, name: str | None) -> Buffer:
        """A client's own memfd as a buffer (udmabuf); the backing is already checked."""
        return self.create(device, backing.size, "memfd", name, backing)

    def tell(self, buffer: Buffer, notice: p.OpArgs) -> None:
        """Tell a remote buffer's exporter, if it is still there, what an importer has done."""
        exporter = buffer.remote
        if exporter is not None and exporter.id in self.devices:
            self.post(exporter, p.Call(None, p.OP_NAMES[type(notice)], notice))

    def check_live(self, buffer: Buffer) -> None:
        if buffer.revoked:
            raise BrokerError(errno.ENODEV, f"buffer {buffer.id} was revoked by its exporter")

    def check_handle(self, device: Device) -> None:
        """Raise EDQUOT if no handle may be minted for ``device`` (before it is minted)."""
        self.quotas.check_handle(device.uid)

    def add_handle(self, buffer: Buffer, key: Key, *, readonly: bool, uid: int) -> None:
        """Record a minted handle, charged to ``uid`` until its last copy is closed."""
        handle = Handle(key=key, buffer=buffer, readonly=readonly, uid=uid)
        self.quotas.charge_handle(uid)
        self.handles[key] = handle
        buffer.handles[key] = handle
        self.observer.handle_added(handle)

    def handle_closed(self, key: Key) -> None:
        """The last copy of a handle was closed, somewhere (the kernel told the server)."""
        handle = self.handles.pop(key, None)
        if handle is None:
            self.sync.handle_closed(key)
        else:
            del handle.buffer.handles[key]
            self.quotas.uncharge_handle(handle.uid)
            self.observer.handle_removed(handle)
            self._maybe_free(handle.buffer)

    # --- references ----------------------------------------------------------------------

    def _add_ref(self, device: Device, buffer: Buffer, *, writable: bool) -> None:
        ref = device.refs.get(buffer.id)
        if ref is None:
            device.refs[buffer.id] = Ref(buffer=buffer, writable=writable)
            buffer.holders[device.id] = device
        else:
            ref.count += 1
            ref.writable |= writable

    def _ref(self, device: Device, buffer_id: int) -> Ref:
        ref = device.refs.get(buffer_id)
        if ref is None:
            raise BrokerError(errno.EBADF, f"buffer {buffer_id} is not held by this device")
        return ref

    def _drop_ref(self, device: Device, ref: Ref) -> None:
        buffer = ref.buffer
        del device.refs[buffer.id]
        del buffer.holders[device.id]
        self._maybe_free(buffer)

    def import_handle(self, device: Device, key: Key) -> Buffer:
        """``dma_buf_get``: the buffer behind a handle this device's process holds."""
        handle = self.handles.get(key)
        if handle is None:
            raise BrokerError(errno.EINVAL, "the descriptor is not a live bufbroker handle")
        self._add_ref(device, handle.buffer, writable=not handle.readonly)
        return handle.buffer

    def name_key(self, device: Device, name: str, uid: int | None) -> tuple[int, str]:
        """Where ``open(name, uid=uid)`` looks: the caller's own names unless root says whose."""
        if uid is None or uid == device.uid:
            return (device.uid, name)
        if device.uid != 0:
            raise BrokerError(errno.EPERM, "only root may open the names of another uid")
        return (uid, name)

    def open(self, device: Device, name: str, uid: int | None = None, *, sealed: bool = False) -> Buffer:
        buffer = self.names.get(self.name_key(device, name, uid))
        if buffer is None:
            raise BrokerError(errno.ENOENT, f"no buffer is named {name!r}")
        if sealed and not buffer.sealed:
            raise BrokerError(errno.EAGAIN, f"buffer {name!r} is not sealed yet")
        self._add_ref(device, buffer, writable=True)
        return buffer

    def share(self, device: Device, buffer_id: int, *, readonly: bool) -> Buffer:
        """Check that the device may mint a handle of this mode (it cannot upgrade)."""
        ref = self._ref(device, buffer_id)
        if not readonly and not ref.writable:
            raise BrokerError(errno.EACCES, "a read-only buffer can only be shared read-only")
        return ref.buffer

    def release(self, device: Device, buffer_id: int) -> None:
        ref = self._ref(device, buffer_id)
        if ref.count > 1:
            ref.count -= 1
            return
        if any(att.buffer is ref.buffer for att in device.attachments.values()):
            raise BrokerError(errno.EBUSY, f"buffer {buffer_id} is still attached; detach first")
        if any(b == buffer_id for b, _ in device.cpu):
            raise BrokerError(errno.EBUSY, f"buffer {buffer_id} has cpu access in progress")
        self._drop_ref(device, ref)

    def set_name(self, device: Device, buffer_id: int, name: str | None) -> Buffer:
        """DMA_BUF_SET_NAME, for holders that may write: the name goes in the owner's namespace."""
        ref = self._ref(device, buffer_id)
        if not ref.writable:
            raise BrokerError(errno.EACCES, "only a holder with write access may rename a buffer")
        self._check_name_free(ref.buffer.owner, name, ref.buffer)
        self._set_name(ref.buffer, name)
        return ref.buffer

    def _set_name(self, buffer: Buffer, name: str | None) -> None:
        if buffer.name is not None:
            del self.names[(buffer.owner, buffer.name)]
        buffer.name = name or None
        if buffer.name is not None:
            self.names[(buffer.owner, buffer.name)] = buffer
        self.observer.changed(buffer)

    def _maybe_free(self, buffer: Buffer) -> None:
        if buffer.alive or buffer.id not in self.buffers:
            return
        del self.buffers[buffer.id]
        self._set_name(buffer, None)
        self.quotas.uncharge(buffer.owner, buffer.span)
        self.sync.drop_reservation(buffer)
        if buffer.backing is not None:
            self.free(buffer.backing)
        self.tell(buffer, p.ReleaseCall(buffer=buffer.id))

    # --- attachments and mappings --------------------------------------------------------

    def attach(self, device: Device, buffer_id: int, *, dynamic: bool = False) -> Attachment:
        """The attachment; for a remote buffer, the server then asks its exporter (who may
        refuse: ``drop_attachment``), as dma_buf_attach calls ``ops->attach``."""
        buffer = self._ref(device, buffer_id).buffer
        self.check_live(buffer)
        limit = self.config.max_attachments_per_device
        if len(device.attachments) >= limit:
            raise BrokerError(errno.EDQUOT, f"max_attachments_per_device ({limit}) reached")
        if buffer.remote is None:  # an exporter chooses its own layouts
            others = self._attached(buffer)
            check_fits(buffer, device, others)
            check_length(buffer, device, others, self.config.max_layout_segments)
        att = Attachment(id=self.new_id("attachment"), device=device, buffer=buffer, dynamic=dynamic)
        buffer.attachments[att.id] = att
        if buffer.attached is None:
            buffer.attached = {}
        buffer.attached[device.id] = buffer.attached.get(device.id, 0) + 1
        device.attachments[att.id] = att
        return att

    def _attached(self, buffer: Buffer) -> list[Device]:
        """The devices attached to ``buffer``, each once, however many attachments it has."""
        return [self.devices[device_id] for device_id in buffer.attached or ()]

    def _attachment(self, device: Device, attachment_id: int) -> Attachment:
        att = device.attachments.get(attachment_id)
        if att is None:
            raise BrokerError(errno.EINVAL, f"no attachment {attachment_id} on this device")
        return att

    def detach(self, device: Device, attachment_id: int) -> None:
        att = self._attachment(device, attachment_id)
        if att.map_count:
            raise BrokerError(errno.EBUSY, f"attachment {attachment_id} is still mapped")
        self._drop_attachment(att)

    def _drop_attachment(self, att: Attachment, *, tell: bool = True) -> None:
        """Gone, mappings and all (the exporter is told of each, then of the detach)."""
        buffer = att.buffer
        del buffer.attachments[att.id]
        assert buffer.attached is not None
        buffer.attached[att.device.id] -= 1
        if not buffer.attached[att.device.id]:
            del buffer.attached[att.device.id]
        del att.device.attachments[att.id]
        if tell:
            for _ in range(att.map_count):
                self.tell(buffer, p.UnmapCall(buffer=buffer.id, attachment=att.id))
            self.tell(buffer, p.DetachCall(buffer=buffer.id, attachment=att.id))
        att.map_count = 0
        if att.stale:
            att.stale = 0
            self.unmapped(buffer)

    def drop_attachment(self, device: Device, attachment_id: int, *, tell: bool) -> None:
        """Undo an attach the exporter refused (``tell=False``) or did not answer in time."""
        att = device.attachments.get(attachment_id)
        if att is not None:
            self._drop_attachment(att, tell=tell)

    def materialize(self, buffer: Buffer, device: Device) -> Backing:
        """The buffer's backing, made now if it has none yet (before a commit off the loop)."""
        return self._materialize(buffer, device)[1]

    def _materialize(self, buffer: Buffer, device: Device) -> tuple[Layout, Backing]:
        """Late allocation: the layout (and memory) chosen for everyone attached right now."""
        if buffer.layout is None:
            wanted = combine(d.constraints for d in self._attached(buffer))
            layout = plan(buffer.span, wanted)
            if layout is None:  # attach refuses such combinations; this guards the invariant
                raise BrokerError(errno.EINVAL, "the attached devices admit no common layout")
            if buffer.backing is None:
                backing = self.heaps[buffer.heap].allocate(buffer)
                fd = backing.fd
                if not self.reserve.allows(device.uid, fd):
                    self.free(backing)
                    self.reserve.check(device.uid, [fd])
                buffer.backing = backing
            buffer.layout = layout
            self.observer.changed(buffer)
        assert buffer.backing is not None
        return buffer.layout, buffer.backing

    def map(self, device: Device, attachment_id: int, direction: Direction) -> Mapped | None:
        """The mapping; None for a remote buffer, whose memory the server then asks its
        exporter for (the mapping is counted meanwhile: undo with ``unmap``)."""
        att = self._attachment(device, attachment_id)
        self.check_live(att.buffer)
        if direction.writes and not device.refs[att.buffer.id].writable:
            raise BrokerError(errno.EACCES, f"a read-only handle cannot be mapped {direction.value}")
        current = att.direction
        if current is not None and current not in (direction, Direction.BIDIRECTIONAL):
            raise BrokerError(
                errno.EBUSY,
                f"attachment {att.id} is mapped {current.value}; unmap it before mapping {direction.value}",
            )
        if direction.writes:
            self._may_write(device, att.buffer)
        mapped = None
        if att.buffer.remote is None:
            mapped = Mapped(*self._materialize(att.buffer, device), direction.writes, att.buffer.size)
        if not att.map_count:
            att.direction = direction
        att.map_count += 1
        return mapped

    def unmap(self, device: Device, attachment_id: int, *, tell: bool = True) -> None:
        att = self._attachment(device, attachment_id)
        if not att.map_count:
            raise BrokerError(errno.EINVAL, f"attachment {attachment_id} is not mapped")
        att.map_count -= 1
        if not att.map_count:
            att.direction = None
            self._maybe_unwritten(att.buffer)
        if tell:
            self.tell(att.buffer, p.UnmapCall(buffer=att.buffer.id, attachment=att.id))
        if att.stale:  # the oldest mapping goes first: one of the old memory is gone
            att.stale -= 1
            self.unmapped(att.buffer)

    # --- cpu access ----------------------------------------------------------------------

    def cpu_begin(self, device: Device, buffer_id: int, access: Access) -> Mapped | None:
        """As ``map``: None for a remote buffer (counted meanwhile: undo with ``cpu_end``)."""
        ref = self._ref(device, buffer_id)
        self.check_live(ref.buffer)
        if access.writes and not ref.writable:
            raise BrokerError(errno.EACCES, "a read-only handle allows cpu access read only")
        if access.writes:
            self._may_write(device, ref.buffer)
        mapped = None
        if ref.buffer.remote is None:
            mapped = Mapped(*self._materialize(ref.buffer, device), access.writes, ref.buffer.size)
        device.cpu[(buffer_id, access)] += 1
        ref.buffer.cpu[(device.id, access)] += 1
        return mapped

    def cpu_end(self, device: Device, buffer_id: int, access: Access, *, tell: bool = True) -> None:
        buffer = self._ref(device, buffer_id).buffer
        if not device.cpu[(buffer_id, access)]:
            del device.cpu[(buffer_id, access)]
            raise BrokerError(errno.EINVAL, f"cpu access {access.value} was not begun")
        for counter, key in ((device.cpu, (buffer_id, access)), (buffer.cpu, (device.id, access))):
            counter[key] -= 1
            if not counter[key]:
                del counter[key]
        self._maybe_unwritten(buffer)
        if tell:
            self.tell(buffer, p.EndCpuCall(buffer=buffer_id, access=access))
