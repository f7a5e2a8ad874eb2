"""Quotas: what each uid holds, against the limits; plain bookkeeping, no I/O.

Buffers are charged to their owner (the exporter's uid) by size at creation, not when their
memory is allocated at the first map: late allocation must not let a uid over-commit. A
handle is charged to the uid it was minted for, for as long as any copy of it is open
anywhere (its broker end is a descriptor the broker holds). Connections, those still in their
handshake, and opens waiting for a name are charged to the peer's uid.
"""

from __future__ import annotations

import errno

from ..protocol import BrokerError
from ._config import Config
from ._records import Usage

__all__ = ["Quotas"]


class Quotas:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.usage: dict[int, Usage] = {}
        self.total_bytes = 0
        self.incomplete = 0  # connections of non-root uids that have not said hello yet

    def of(self, uid: int) -> Usage:
        return self.usage.get(uid) or Usage()

    def _usage(self, uid: int) -> Usage:
        return self.usage.setdefault(uid, Usage())

    def _forget_idle(self, uid: int) -> None:
        if self.usage.get(uid) == Usage():
            del self.usage[uid]

    def admit(self, uid: int) -> None:
        """Count a new connection against its uid's limit (before hello: it holds a slot)."""
        usage = self._usage(uid)
        if usage.connections >= self.config.max_connections_per_uid:
            raise BrokerError(
                errno.ECONNREFUSED,
                f"uid {uid} already has {usage.connections} connections "
                f"(max_connections_per_uid={self.config.max_connections_per_uid})",
            )
        usage.connections += 1

    def leave(self, uid: int) -> None:
        self._usage(uid).connections -= 1
        self._forget_idle(uid)

    def begin_handshake(self, uid: int) -> None:
        """Count a connection that has not said hello yet; root is held back by its own only.

        The global limit bounds what all other uids together may keep waiting; each uid's
        limit keeps one uid from taking it all.
        """
        cfg = self.config
        usage = self._usage(uid)
        if usage.incomplete >= cfg.max_incomplete_connections_per_uid:
            raise BrokerError(
                errno.EAGAIN,
                f"uid {uid} has {usage.incomplete} connections still handshaking "
                f"(max_incomplete_connections_per_uid={cfg.max_incomplete_connections_per_uid})",
            )
        if uid != 0 and self.incomplete >= cfg.max_incomplete_connections:
            raise BrokerError(errno.EAGAIN, "too many connections are still handshaking")
        usage.incomplete += 1
        self.incomplete += uid != 0

    def end_handshake(self, uid: int) -> None:
        self._usage(uid).incomplete -= 1
        self.incomplete -= uid != 0
        self._forget_idle(uid)

    def check_handle(self, uid: int) -> None:
        """Raise EDQUOT if ``uid`` may not have one more handle (checked before one is minted)."""
        handles = self.of(uid).handles
        if handles >= self.config.max_handles_per_uid:
            raise BrokerError(
                errno.EDQUOT,
                f"uid {uid} has {handles} live handles (max_handles_per_uid="
                f"{self.config.max_handles_per_uid}); close some",
            )

    def charge_handle(self, uid: int) -> None:
        self._usage(uid).handles += 1

    def uncharge_handle(self, uid: int) -> None:
        self._usage(uid).handles -= 1
        self._forget_idle(uid)

    def begin_wait(self, uid: int) -> None:
        """Count an open that waits for its name, or raise EDQUOT."""
        usage = self._usage(uid)
        if usage.waiting >= self.config.max_waiting_opens_per_uid:
            self._forget_idle(uid)
            raise BrokerError(
                errno.EDQUOT,
                f"uid {uid} has {usage.waiting} opens waiting (max_waiting_opens_per_uid="
                f"{self.config.max_waiting_opens_per_uid})",
            )
        usage.waiting += 1

    def end_wait(self, uid: int) -> None:
        self._usage(uid).waiting -= 1
        self._forget_idle(uid)

    def check(self, uid: int, size: int) -> None:
        """Raise the errno a new buffer of ``size`` bytes for ``uid`` would get, if any."""
        cfg = self.config
        if size > cfg.max_buffer_size:
            raise BrokerError(errno.EINVAL, f"{size} bytes is above max_buffer_size ({cfg.max_buffer_size})")
        if self.total_bytes + size > cfg.max_memory:
            raise BrokerError(
                errno.ENOMEM, f"{size} more bytes would pass the broker's max_memory ({cfg.max_memory})"
            )
        usage = self.of(uid)
        if usage.buffers + 1 > cfg.max_buffers_per_uid:
            raise BrokerError(
                errno.EDQUOT,
                f"uid {uid} owns {usage.buffers} buffers (max_buffers_per_uid={cfg.max_buffers_per_uid})",
            )
        if usage.bytes + size > cfg.max_bytes_per_uid:
            raise BrokerError(
                errno.EDQUOT,
                f"uid {uid} owns {usage.bytes} bytes; {size} more would pass "
                f"max_bytes_per_uid ({cfg.max_bytes_per_uid})",
            )

    def charge(self, uid: int, size: int) -> None:
        usage = self._usage(uid)
        usage.buffers += 1
        usage.bytes += size
        self.total_bytes += size

    def uncharge(self, uid: int, size: int) -> None:
        usage = self._usage(uid)
        usage.buffers -= 1
        usage.bytes -= size
        self.total_bytes -= size
        self._forget_idle(uid)

    def charge_object(self, uid: int, kind: str) -> None:
        """Count one more timeline or fence (``kind``) against ``uid``: EDQUOT past its limit."""
        limit = getattr(self.config, f"max_{kind}_per_uid")
        usage = self._usage(uid)
        held = getattr(usage, kind)
        if held >= limit:
            self._forget_idle(uid)
            raise BrokerError(errno.EDQUOT, f"uid {uid} owns {held} {kind} (max_{kind}_per_uid={limit})")
        setattr(usage, kind, held + 1)

    def charge_object_unchecked(self, uid: int, kind: str) -> None:
        """Count an object that already existed within the limits (one kept across a restart)."""
        usage = self._usage(uid)
        setattr(usage, kind, getattr(usage, kind) + 1)

    def uncharge_object(self, uid: int, kind: str) -> None:
        usage = self._usage(uid)
        setattr(usage, kind, getattr(usage, kind) - 1)
        self._forget_idle(uid)
