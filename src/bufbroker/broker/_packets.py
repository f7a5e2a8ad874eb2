"""Packets as they arrive: the receive buffer, one packet and its descriptors, and the bag that
owns those descriptors until an op takes one or they are discarded (closed off the loop).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import trio

from .. import protocol as p
from ._discard import Discard

__all__ = ["NO_FDS", "FdBag", "inbox", "packet", "receive"]


class FdBag:
    """Received descriptors: each is taken on purpose, or discarded (closed off the loop)."""

    def __init__(self, fds: Sequence[int], discard: Discard | None = None, uid: int = 0) -> None:
        self.fds = list(fds)
        self._discard = discard
        self._uid = uid

    def take(self, index: int) -> int:
        fd, self.fds[index] = self.fds[index], -1
        return fd

    def take_all(self) -> list[int]:
        fds = [fd for fd in self.fds if fd >= 0]
        self.fds.clear()
        return fds

    def close(self) -> None:
        if self.fds:
            left = [fd for fd in self.fds if fd >= 0]
            self.fds.clear()
            if self._discard is not None:
                self._discard.close(self._uid, left)
            else:
                p.close_all(left)


NO_FDS = FdBag(())  # shared by the packets that carry none (most): nothing to take or close


def inbox(size: int) -> mmap.mmap:
    """A receive buffer for one connection.

    Reused for every packet (a fresh max_message_size bytes per request would be an
    allocation on the hot path), and anonymous memory, so that only the pages packets really
    touch count against the broker's RSS: a 64 KiB buffer costs one page for small requests.
    """
    return mmap.mmap(-1, size)


async def receive(
    sock: trio.socket.SocketType, inbox: mmap.mmap, max_fds: int
) -> tuple[memoryview, list[int], bool]:
    """One packet into ``inbox``: (data, fds, truncated). FdOverflow comes with its fds open.

    ``data`` is a view of ``inbox``, valid until the next receive into it. The handshake's
    way; a connection's requests come in through ``Connection._receive``.
    """
    n, ancdata, flags, _ = await sock.recvmsg_into([inbox], p.ancillary_space(max_fds), p.RECV_FLAGS)
    return packet(inbox, n, ancdata, flags, max_fds)


def packet(
    inbox: mmap.mmap, n: int, ancdata: list[tuple[int, int, bytes]], flags: int, max_fds: int
) -> tuple[memoryview, list[int], bool]:
    fds = p.fds_from_ancillary(ancdata, flags, max_fds, close=False) if ancdata or flags else []
    return memoryview(inbox)[:n], fds, bool(flags & p.MSG_TRUNC)
