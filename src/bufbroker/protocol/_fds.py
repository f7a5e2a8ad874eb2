"""SCM_RIGHTS: descriptors beside a packet, packed and unpacked without leaking one.

Python's ``socket.recv_fds`` neither asks for MSG_CMSG_CLOEXEC nor looks at MSG_CTRUNC, and it
drops a trailing partial descriptor silently: a broker must do all three, so it receives with
``recvmsg`` and hands the ancillary data here.
"""

from __future__ import annotations

import _socket as socket  # the C module: socket.py costs start-up time
import array
import errno
import functools
import os
from collections.abc import Iterable, Sequence

from ._errors import BrokerError

__all__ = [
    "HANDLE_MARK",
    "MSG_TRUNC",
    "RECV_FLAGS",
    "FdOverflow",
    "ancillary",
    "ancillary_space",
    "close_all",
    "fds_from_ancillary",
    "one_handle",
]

# Plain ints: socket's constants are IntFlag members, and every ``&`` on one goes through the
# enum machinery, a couple of microseconds on the per-packet path.
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
MSG_TRUNC = int(socket.MSG_TRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_INT = array.array("i").itemsize

AncData = list[tuple[int, int, bytes]]


class FdOverflow(BrokerError):
    """A packet carried more descriptors than the receiver had room for (MSG_CTRUNC).

    ``fds`` are those that did fit, still open when the receiver asked to close them itself.
    """

    fds: list[int] = []  # noqa: RUF012 (replaced per instance, never changed in place)


@functools.cache
def ancillary_space(max_fds: int) -> int:
    """The ``ancbufsize`` for ``recvmsg`` that holds at most ``max_fds`` descriptors."""
    return socket.CMSG_SPACE(max_fds * _INT)


def ancillary(fds: Sequence[int]) -> AncData:
    """The ancillary data that sends ``fds`` with a packet (none if empty)."""
    if not fds:
        return []
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 (on the per-request path; cheaper than contextlib.suppress)
            os.close(fd)
        except OSError:
            pass


HANDLE_MARK = b"H"
"""The byte sent with a handle by send_handle: stream sockets cannot carry fds without data."""


def one_handle(fds: list[int]) -> int:
    """The handle among descriptors received with HANDLE_MARK; extras are closed."""
    if not fds:
        raise BrokerError(errno.EBADF, "the message carried no handle (did the peer close?)")
    close_all(fds[1:])
    return fds[0]


def fds_from_ancillary(ancdata: AncData, msg_flags: int, max_fds: int, *, close: bool = True) -> list[int]:
    """Every descriptor the kernel installed for one ``recvmsg``.

    On MSG_CTRUNC the kernel has already dropped what did not fit; the ones that did fit are
    closed here (or, with ``close=False``, left open in the exception's ``fds`` for a caller
    that closes them elsewhere) and ``FdOverflow`` is raised, so a truncated message never
    half-applies. The kernel rounds the control buffer up to 8 bytes, so with an odd
    ``max_fds`` one more may fit than was allowed: that is an overflow too.
    """
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            whole = len(data) - len(data) % _INT
            fds.extend(array.array("i", data[:whole]))
    if msg_flags & _CTRUNC or len(fds) > max_fds:
        error = FdOverflow(errno.ETOOMANYREFS, f"a message may carry at most {max_fds} descriptors")
        if close:
            close_all(fds)
        else:
            error.fds = fds
        raise error
    return fds
