"""Buffers whose memory and ops live in a client process (an exporter): the model's rules.

Plain Python over the records, like ``_state``, whose ``State`` these functions take. The
server forwards an importer's attach, map and cpu access to the exporter (``_forward``); here
is what needs no waiting: making such a buffer, revoking it, starting a move, and counting
the calls an exporter owes.

Linux's rules, kept: an exporter that goes away (or revokes) leaves its buffers to their
holders, who may still unmap, detach and release, but get ENODEV for anything new, as a
dma-buf whose driver was unbound does. A move is ``dma_buf_move_notify``: every dynamic
attachment is told, and the mappings they had are *stale* until unmapped; a static
(non-dynamic) attachment pins the buffer, as dma_buf_attach pins for an importer without
``move_notify``, so a move with one present is EBUSY. So is a move while cpu access is under
way, since the cpu sees the memory the access began with.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .. import protocol as p
from ..protocol import BrokerError, page_round
from ._records import Attachment, Buffer, Device, PendingCall

if TYPE_CHECKING:
    from ._state import State

__all__ = ["begin_call", "end_call", "export_remote", "move", "revoke", "revoke_buffer"]


def export_remote(state: State, device: Device, size: int, *, name: str | None) -> Buffer:
    """``dma_buf_export`` by a client: the buffer's memory and ops stay with ``device``.

    Charged to its uid like any buffer (count and bytes): its memory is pinned as long as
    someone maps it, whoever's process holds the pages.
    """
    if not device.exporter:
        raise BrokerError(errno.EOPNOTSUPP, f"{device.label} registered no exporter at hello")
    if size == 0:
        raise BrokerError(errno.EINVAL, "size must be at least 1 byte")
    return state.create(device, page_round(size), "exporter", name, None, remote=device)


def _own(state: State, device: Device, buffer_id: int) -> Buffer:
    ref = device.refs.get(buffer_id)
    buffer = ref.buffer if ref is not None else state.buffers.get(buffer_id)
    if buffer is None or buffer.remote is not device:
        raise BrokerError(errno.EPERM, f"buffer {buffer_id} is not one this device exports")
    return buffer


def revoke_buffer(state: State, buffer: Buffer) -> None:
    """No new attach, map or cpu access (ENODEV); every holder but the exporter is told."""
    if buffer.revoked:
        return
    buffer.revoked = True
    for holder in buffer.holders.values():
        if holder is not buffer.remote:
            state.post(holder, p.Event("revoked", {"buffer": buffer.id}))


def revoke(state: State, device: Device, buffer_id: int) -> Buffer:
    """The exporter takes its buffer back (it may still be held; it stays readable).

    The exporter's timelines that the buffer's reservation still waits on are failed with
    ENODEV: the work they stand for was on memory it took back, and nobody may wait for it for
    ever. (An exporter that dies fails all its timelines with ESRCH instead, as any signaller.)
    """
    buffer = _own(state, device, buffer_id)
    revoke_buffer(state, buffer)
    for timeline in {r.timeline for r in buffer.reservation if r.timeline.live is device}:
        state.sync.fail(timeline, errno.ENODEV)  # a timeline failed already keeps its error
    return buffer


def move(state: State, device: Device, buffer_id: int) -> tuple[Buffer, list[Attachment]]:
    """Start a move: tell every dynamic attachment; the mapped ones are stale until unmapped.

    Returns the buffer and the attachments whose old mappings the move waits for. The caller
    decrements ``buffer.moving`` once it stops waiting.
    """
    buffer = _own(state, device, buffer_id)
    state.check_live(buffer)
    pinned = [a for a in buffer.attachments.values() if not a.dynamic]
    if pinned:
        raise BrokerError(
            errno.EBUSY,
            f"buffer {buffer.id} is pinned by the static attachment of {pinned[0].device.label}",
        )
    if buffer.cpu:
        raise BrokerError(errno.EBUSY, f"buffer {buffer.id} has cpu access under way")
    waiting = []
    for att in buffer.attachments.values():
        att.stale = att.map_count
        if att.stale:
            waiting.append(att)
        state.post(att.device, p.Event("move", {"buffer": buffer.id, "attachment": att.id}))
    buffer.moving += 1
    return buffer, waiting


def begin_call(state: State, importer: Device, buffer: Buffer, op: str) -> PendingCall:
    """Count a call to ``buffer``'s exporter: at most ``max_exporter_calls`` at once (EAGAIN),
    and of those at most half from any one uid but the exporter's own, so that the importers
    of one user cannot take every call a slow exporter has room for from everyone else."""
    exporter = buffer.remote
    assert exporter is not None
    limit = state.config.max_exporter_calls
    if len(exporter.calls) >= limit:
        raise BrokerError(
            errno.EAGAIN, f"{exporter.label} already has {limit} calls unanswered (max_exporter_calls)"
        )
    if importer.uid != exporter.uid:
        share = max(1, limit // 2)
        if sum(1 for c in exporter.calls.values() if c.importer.uid == importer.uid) >= share:
            raise BrokerError(
                errno.EAGAIN,
                f"uid {importer.uid} already has {share} calls waiting on {exporter.label} "
                "(half of max_exporter_calls)",
            )
    call = PendingCall(
        id=state.new_id("call"),
        op=op,
        exporter=exporter,
        importer=importer,
        buffer=buffer,
        started=state.clock(),
    )
    exporter.calls[call.id] = call
    return call


def end_call(call: PendingCall) -> None:
    call.exporter.calls.pop(call.id, None)
