"""The buffer ops of one connection: each request's call into the state model, and its reply.

``answer`` is one ``match`` over the op records, each case a line or two; the errno comes from
the state model, the descriptors (handles, backings) from here, the I/O from the connection.
Timelines and fences (``_fence_ops``) and streams (``_stream_ops``) have modules of their own.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from .. import protocol as p
from ..protocol import BrokerError
from . import _fence_ops, _stream_ops
from ._backing_ops import map_result
from ._exports import export_remote, revoke
from ._handles import handle_key
from ._heap import adopt_memfd
from ._introspect import buffer_page, device_page, heap_list, stats, stream_page, timeline_page
from ._records import Buffer
from ._state import Mapped

if TYPE_CHECKING:
    from ._connection import Connection
    from ._packets import FdBag

__all__ = ["answer", "backing_reply", "describe", "seal_state", "with_handle"]


def answer(conn: Connection, request: p.Request, args: p.OpArgs, bag: FdBag) -> tuple[Any, list[int]]:
    """Apply one request (``args``: its arguments, references resolved) to the state;
    returns (result, descriptors to send and close)."""
    state, dev, server = conn.state, conn.device, conn.server
    match args:
        case p.Ping():
            return {}, []
        case p.Allocate(size=size, name=name, heap=heap, sealable=sealable):
            buffer = state.allocate(dev, size, name=name, heap=heap, sealable=sealable)
            return with_handle(conn, buffer, readonly=False, new_ref=True)
        case p.ExportMemfd(name=name):
            backing = adopt_memfd(bag.fds[0])
            bag.take(0)
            try:
                buffer = state.export(dev, backing, name=name)
            except BrokerError:
                state.free(backing)
                raise
            return with_handle(conn, buffer, readonly=False, new_ref=True)
        case p.Import():
            try:
                key = handle_key(bag.fds[0])
            except OSError:  # not a socket: no handle either
                raise BrokerError(errno.EINVAL, "the descriptor is not a bufbroker handle") from None
            buffer = state.import_handle(dev, key)
            # A live handle's client end: a quick close, its queue holds our byte at most.
            os.close(bag.take(0))
            return describe(conn, buffer), []
        case p.Open(name=name, uid=uid, sealed=sealed):
            buffer = state.open(dev, name, uid, sealed=sealed)
            return with_handle(conn, buffer, readonly=False, new_ref=True)
        case p.Share(buffer=int(buffer_id), readonly=readonly):
            return with_handle(conn, state.share(dev, buffer_id, readonly=readonly), readonly=readonly)
        case p.SetName(buffer=int(buffer_id), name=name):
            buffer = state.set_name(dev, buffer_id, name)
            if name:
                server.names.appeared((buffer.owner, name))
            return {}, []
        case p.Release(buffer=int(buffer_id)):
            state.release(dev, buffer_id)
            return {}, []
        case p.Attach(buffer=int(buffer_id), dynamic=dynamic):
            return {"attachment": state.attach(dev, buffer_id, dynamic=dynamic).id}, []
        case p.Detach(attachment=int(att)):
            state.detach(dev, att)
            return {}, []
        case p.Map(attachment=int(att), direction=direction):
            mapped = state.map(dev, att, direction)
            return backing_reply(mapped, lambda: state.unmap(dev, att))
        case p.Unmap(attachment=int(att)):
            state.unmap(dev, att)
            return {}, []
        case p.CpuBegin(buffer=int(buffer_id), access=access):
            mapped = state.cpu_begin(dev, buffer_id, access)
            return backing_reply(mapped, lambda: state.cpu_end(dev, buffer_id, access))
        case p.CpuEnd(buffer=int(buffer_id), access=access):
            state.cpu_end(dev, buffer_id, access)
            return {}, []
        case p.Buffers(after=after):
            entries, more = buffer_page(state, dev.uid, after)
            return {"buffers": entries, "more": more}, []
        case p.Devices(after=after):
            entries, more = device_page(state, dev.uid, after)
            return {"devices": entries, "more": more}, []
        case p.Heaps():
            return {"heaps": heap_list(state, dev.uid)}, []
        case p.Timelines(after=after):
            entries, more = timeline_page(state, dev.uid, after)
            return {"timelines": entries, "more": more}, []
        case _ if type(args) in _fence_ops.OPS:
            return _fence_ops.answer(conn, args, bag)
        case p.Stats():
            return stats(state, dev.uid, server.version, server.connections), []
        case p.Export(size=size, name=name):
            buffer = export_remote(state, dev, size, name=name)
            return with_handle(conn, buffer, readonly=False, new_ref=True)
        case p.Move():  # with no exporter connected: the caller exports nothing
            raise BrokerError(errno.EPERM, "only the exporter of a buffer may move it")
        case p.Revoke(buffer=int(buffer_id)):
            buffer = revoke(state, dev, buffer_id)
            server.forwarder.abort(
                BrokerError(errno.ENODEV, f"buffer {buffer_id} was revoked"), buffer=buffer
            )
            return {}, []
        case p.Streams(after=after):
            entries, more = stream_page(state, dev.uid, after)
            return {"streams": entries, "more": more}, []
        case _ if type(args) in _stream_ops.OPS:
            return _stream_ops.answer(conn, args)
    raise BrokerError(errno.ENOTTY, f"{request.op} cannot be used after hello")


def describe(conn: Connection, buffer: Buffer) -> dict[str, Any]:
    """A buffer as allocate, open, import and export describe it to ``conn``'s device."""
    uid = conn.device.uid
    theirs = uid != 0 and buffer.owner != uid  # names of other uids are theirs alone
    return {
        "id": buffer.id,
        "size": buffer.size,
        "name": None if theirs else buffer.name,
        "heap": buffer.heap,
        "exporter": None if theirs else buffer.exporter[1],
        "readonly": not conn.device.refs[buffer.id].writable,
        **({"revoked": True} if buffer.revoked else {}),  # said only when it is so
        **({"sealable": True, **seal_state(buffer)} if buffer.sealable else {}),  # only then
    }


def seal_state(buffer: Buffer) -> dict[str, bool]:
    return {"sealed": buffer.sealed, "immutable": buffer.immutable}


def with_handle(
    conn: Connection, buffer: Buffer, *, readonly: bool, new_ref: bool = False
) -> tuple[Any, list[int]]:
    """A freshly minted handle for ``buffer``, charged to this uid; if that fails, the
    request is undone."""
    dev, handles = conn.device, conn.server.handles
    try:
        conn.state.check_handle(dev)
        try:
            ours, theirs, key = handles.mint(dev.uid)
        except OSError as e:
            raise BrokerError(e.errno or errno.EMFILE, f"cannot mint a handle: {e.strerror}") from None
        if not conn.state.reserve.allows(dev.uid, ours):
            os.close(theirs)
            handles.discard(key)
            conn.state.reserve.check(dev.uid, [ours])
    except BrokerError:
        if new_ref:
            conn.state.release(dev, buffer.id)
        raise
    conn.state.add_handle(buffer, key, readonly=readonly, uid=dev.uid)
    if new_ref and buffer.name:
        conn.server.names.appeared((buffer.owner, buffer.name))
    return (describe(conn, buffer) if new_ref else {}), [theirs]


def backing_reply(mapped: Mapped | None, undo: Any) -> tuple[Any, list[int]]:
    """A map or cpu access reply: the layout and the backing's descriptors for the client."""
    if mapped is None:  # a remote buffer's, which _forward answers: a race with a revoke
        undo()
        raise BrokerError(errno.ENODEV, "the buffer's exporter is gone")
    if mapped.backing.lazy:  # its memory is committed before any map is answered (_respond)
        undo()
        raise BrokerError(errno.EAGAIN, "the buffer's memory is not committed yet: map again")
    # attach refused any layout longer than max_layout_segments: this always fits a reply
    segments = mapped.layout.to_wire()
    try:
        fds = mapped.backing.descriptors(mapped.writable)
    except OSError as e:
        undo()
        raise BrokerError(e.errno or errno.EMFILE, f"cannot hand out the backing: {e.strerror}") from None
    return map_result(segments, mapped.size, mapped.backing.size, mapped.writable), fds
