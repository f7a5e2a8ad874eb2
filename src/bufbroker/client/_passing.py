"""Passing handles between processes over any Unix socket (blocking sockets)."""

from __future__ import annotations

import errno
import socket

from ..protocol import RECV_FLAGS, BrokerError, ancillary, ancillary_space, close_all, fds_from_ancillary

__all__ = ["recv_handle", "send_handle"]

_MARK = b"H"  # stream sockets cannot carry descriptors without at least one byte


def send_handle(sock: socket.socket, fd: int) -> None:
    """Send handle ``fd`` over a connected Unix socket; the caller still owns (and may close) it."""
    sock.sendmsg([_MARK], ancillary([fd]))


def recv_handle(sock: socket.socket) -> int:
    """Receive one handle sent with ``send_handle``; the caller owns the returned fd."""
    _, ancdata, flags, _ = sock.recvmsg(len(_MARK), ancillary_space(4), RECV_FLAGS)
    fds = fds_from_ancillary(ancdata, flags, 4)
    if not fds:
        raise BrokerError(errno.EBADF, "the message carried no handle (did the peer close?)")
    close_all(fds[1:])
    return fds[0]
