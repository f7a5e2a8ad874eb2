"""Whether a Unix socket still exists, asked of the kernel by inode and cookie (unix_diag).

A handle's end-of-file cannot tell "every copy was closed" from "some holder called
shutdown()": both leave the broker's end shut down both ways. Only the kernel's socket table
can: a released socket is gone from it, one that was shut down is still there. The cookie
makes the answer exact: a socket that got the inode number again later is not the handle
(the kernel answers ESTALE).

Each lookup blocks on the kernel (which walks its Unix sockets), so the broker asks from a
worker thread; never a dump of the whole table, whose parsing would hold the interpreter.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct

__all__ = ["SocketDiag", "socket_cookie"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_TIMEOUT = 2.0  # seconds: the kernel answers at once, this is insurance
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBHIIIII")  # struct unix_diag_req
_ALL_STATES = 0xFFFFFFFF
_SO_COOKIE = 57  # asm-generic/socket.h; Python has no name for it
_U64 = struct.Struct("=Q")


def socket_cookie(fd: int) -> int:
    """The socket's SO_COOKIE: 64 bits the kernel never gives another. OSError for a non-socket.

    Nothing here can wait on what the descriptor is (unlike fstat of a FUSE file).
    """
    sock = socket.socket(fileno=fd)
    try:
        value: int = _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, _U64.size))[0]
        return value
    finally:
        sock.detach()


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
            if not self.exists(os.fstat(probe.fileno()).st_ino, socket_cookie(probe.fileno())):
                raise OSError(errno.EAFNOSUPPORT, "the kernel does not answer unix_diag lookups")
        except OSError:
            self._sock.close()
            raise
        finally:
            probe.close()
            other.close()

    def exists(self, ino: int, cookie: int) -> bool:
        """Whether the Unix socket with inode ``ino`` and ``cookie`` has not been released yet."""
        seq = next(self._seq)
        body = _REQUEST.pack(socket.AF_UNIX, 0, 0, _ALL_STATES, ino, 0, cookie & 0xFFFFFFFF, cookie >> 32)
        header = _HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, got, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                if got == seq:  # else a late answer to a lookup that failed half-way
                    if kind != _NLMSG_ERROR:
                        return True
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if code in (-errno.ENOENT, -errno.ESTALE):
                        return False
                    raise OSError(-code, f"sock_diag lookup failed: {errno.errorcode.get(-code, code)}")
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
