"""Passing handles between processes over any Unix socket (blocking sockets)."""

from __future__ import annotations

import _socket as socket  # the C module: socket.py costs start-up time

from ..protocol import HANDLE_MARK, RECV_FLAGS, ancillary, ancillary_space, fds_from_ancillary, one_handle

__all__ = ["recv_handle", "send_handle"]


def send_handle(sock: socket.socket, fd: int) -> None:
    """Send handle ``fd`` over a connected Unix socket; the caller still owns (and may close) it."""
    sock.sendmsg([HANDLE_MARK], ancillary([fd]))


def recv_handle(sock: socket.socket) -> int:
    """Receive one handle sent with ``send_handle``; the caller owns the returned fd."""
    _, ancdata, flags, _ = sock.recvmsg(len(HANDLE_MARK), ancillary_space(4), RECV_FLAGS)
    return one_handle(fds_from_ancillary(ancdata, flags, 4))
