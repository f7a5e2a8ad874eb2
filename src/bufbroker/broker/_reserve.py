"""The descriptors kept for root, so that no other uid can lock root out of the broker.

Every buffer, handle and connection costs the broker a descriptor, and the kernel gives each
new one the lowest free number. So a descriptor numbered at or above ``ceiling`` means the
table is full below it: such a descriptor is refused to every uid but root (EMFILE), and closed
again at once. Whatever other uids hold is then numbered below the ceiling, and the numbers
above it stay free for root, however many descriptors the others managed to take. One
comparison per new descriptor, and no count to keep in step with every open and close.
"""

from __future__ import annotations

import errno
import resource

from ..protocol import BrokerError

__all__ = ["Reserve"]


class Reserve:
    def __init__(self, reserve: int, limit: int | None = None) -> None:
        """Keep the top ``reserve`` of ``limit`` descriptors (default: the soft RLIMIT_NOFILE)."""
        if limit is None:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if limit == resource.RLIM_INFINITY:
                limit = 1 << 20
        self.ceiling = max(limit - reserve, 0)

    def allows(self, uid: int, fd: int) -> bool:
        return uid == 0 or fd < self.ceiling

    def check(self, uid: int, fds: list[int] | tuple[int, ...]) -> None:
        """Raise EMFILE if a descriptor in ``fds`` is one kept for root (the caller closes them)."""
        if uid != 0 and fds and max(fds) >= self.ceiling:
            raise BrokerError(
                errno.EMFILE,
                "the broker is out of descriptors for users other than root: close some handles "
                "or buffers (fd_reserve)",
            )
