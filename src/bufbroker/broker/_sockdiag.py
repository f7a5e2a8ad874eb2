"""Whether a Unix socket still exists, asked of the kernel by inode (sock_diag, unix_diag).

A handle's end-of-file cannot tell "every copy was closed" from "some holder called
shutdown()": both leave the broker's end shut down both ways. Only the kernel's socket table
can: a released socket is gone from it, one that was shut down is still there.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct

__all__ = ["SocketDiag"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBHIIIII")  # struct unix_diag_req
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF


class SocketDiag:
    """One netlink socket for exact lookups; raises OSError at creation where there is none."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        )
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

    def exists(self, ino: int) -> bool:
        """Whether the Unix socket with inode ``ino`` has not been released yet."""
        seq = next(self._seq)
        body = _REQUEST.pack(socket.AF_UNIX, 0, 0, _ALL_STATES, ino, 0, _NO_COOKIE, _NO_COOKIE)
        header = _HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(8192)
            _, kind, _, got, _ = _HEADER.unpack_from(data)
            if got != seq:
                continue  # a late answer to a lookup that failed half-way
            if kind != _NLMSG_ERROR:
                return True
            (code,) = struct.unpack_from("=i", data, _HEADER.size)
            if code == -errno.ENOENT:
                return False
            raise OSError(-code, f"sock_diag lookup failed: {errno.errorcode.get(-code, code)}")

    def close(self) -> None:
        self._sock.close()
