"""Whether a Unix socket still exists, asked of the kernel by inode (sock_diag, unix_diag).

A handle's end-of-file cannot tell "every copy was closed" from "some holder called
shutdown()": both leave the broker's end shut down both ways. Only the kernel's socket table
can: a released socket is gone from it, one that was shut down is still there.

The kernel finds a socket by inode by walking every Unix socket, so many lookups at once (a
process that held thousands of handles exits) are made as one dump of the table instead.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Collection, Iterator

__all__ = ["SocketDiag"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_EXACT_AT_MOST = 16  # lookups one by one; beyond, one dump of the whole table
_TIMEOUT = 2.0  # seconds: the kernel answers at once, this is insurance for the event loop
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBHIIIII")  # struct unix_diag_req
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF


class SocketDiag:
    """One netlink socket for lookups; raises OSError at creation where there is none."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        )
        self._sock.settimeout(_TIMEOUT)
        self._seq = itertools.count(1)
        # Without the unix_diag module every lookup says ENOENT, as for a released socket: a
        # socket known to exist must be found.
        probe, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            if not self.exists(os.fstat(probe.fileno()).st_ino):
                raise OSError(errno.EAFNOSUPPORT, "the kernel does not answer unix_diag lookups")
        except OSError:
            self._sock.close()
            raise
        finally:
            probe.close()
            other.close()

    def existing(self, inos: Collection[int]) -> set[int]:
        """Those of the Unix socket inodes ``inos`` whose sockets have not been released."""
        if len(inos) <= _EXACT_AT_MOST:
            return {ino for ino in inos if self.exists(ino)}
        return self._all() & set(inos)

    def exists(self, ino: int) -> bool:
        """Whether the Unix socket with inode ``ino`` has not been released yet."""
        found = False
        for kind, data, offset in self._ask(_NLM_F_REQUEST, ino):
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset)
                if code == -errno.ENOENT:
                    return False
                raise OSError(-code, f"sock_diag lookup failed: {errno.errorcode.get(-code, code)}")
            found = True
        return found

    def _all(self) -> set[int]:
        inos: set[int] = set()
        for kind, data, offset in self._ask(_NLM_F_REQUEST | _NLM_F_DUMP, 0):
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset)
                raise OSError(-code, f"sock_diag dump failed: {errno.errorcode.get(-code, code)}")
            inos.add(struct.unpack_from("=I", data, offset + 4)[0])  # struct unix_diag_msg
        return inos

    def _ask(self, flags: int, ino: int) -> Iterator[tuple[int, bytes, int]]:
        """Send one request; yield (type, packet, offset of the payload) of each answer."""
        seq = next(self._seq)
        body = _REQUEST.pack(socket.AF_UNIX, 0, 0, _ALL_STATES, ino, 0, _NO_COOKIE, _NO_COOKIE)
        self._sock.send(_HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body)
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, got, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    return
                if got == seq:  # else a late answer to a lookup that failed half-way
                    if kind == _NLMSG_DONE:
                        return
                    yield kind, data, offset + _HEADER.size
                    if not flags & _NLM_F_DUMP:
                        return
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
