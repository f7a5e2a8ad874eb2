"""Quotas: what each uid holds, against the limits; plain bookkeeping, no I/O.

Buffers are charged to their owner (the exporter's uid) by size at creation, not when their
memory is allocated at the first map: late allocation must not let a uid over-commit.
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
