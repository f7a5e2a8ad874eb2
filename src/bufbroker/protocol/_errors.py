"""The errors bufbroker raises, one small tree.

::

    OSError
     └── BrokerError            an operation failed; .errno is the broker's (EINVAL, EBUSY, ...)
          ├── ProtocolError     the peer broke the wire protocol (EPROTO); the connection is closed
          └── BrokerUnavailable no broker listens on the socket path (ECONNREFUSED / ENOENT)

"The caller misused the API" is a ``BrokerError`` with the errno the kernel's dma-buf would give;
"the peer misbehaved" is a ``ProtocolError``. Both are OSErrors, so code that already handles
``OSError`` from a driver's ioctl handles ours the same way.
"""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BrokerError", "BrokerUnavailable", "ProtocolError", "errno_code", "errno_from_code"]


def errno_code(number: int) -> str:
    """The symbolic name of an errno (``EINVAL``), as carried on the wire beside the number."""
    return _errno.errorcode.get(number, f"E{number}")


def errno_from_code(code: str, fallback: int) -> int:
    """The local errno for a symbolic name; names are portable across architectures, numbers not."""
    return int(getattr(_errno, code, fallback))


class BrokerError(OSError):
    """An operation failed; ``errno`` says why, as the kernel's dma-buf would."""

    def __init__(self, number: int, message: str | None = None) -> None:
        super().__init__(number, message if message is not None else os.strerror(number))

    @property
    def code(self) -> str:
        return errno_code(self.errno or 0)

    def __reduce__(self) -> tuple[type[BrokerError], tuple[int, str]]:
        return type(self), (self.errno or 0, self.strerror or "")


class ProtocolError(BrokerError):
    """The peer sent something that is not a valid bufbroker message."""

    def __init__(self, message: str, number: int = _errno.EPROTO) -> None:
        super().__init__(number, message)

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str, int]]:  # type: ignore[override]
        return type(self), (self.strerror or "", self.errno or _errno.EPROTO)


class BrokerUnavailable(BrokerError):
    """Nothing is listening on the broker's socket path."""

    def __init__(self, path: str, number: int = _errno.ECONNREFUSED, *, default: bool = True) -> None:
        self.path = path
        self.default = default
        # Where the caller named the socket, the only advice that fits is to start a broker
        # there; systemd's socket and $BUFBROKER_SOCKET are about the default path.
        hint = " (or `systemctl start bufbroker.socket`), or set $BUFBROKER_SOCKET" if default else ""
        super().__init__(
            number, f"no bufbroker broker at {path}: start one with `bufbrokerd --socket {path}`{hint}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return _unavailable, (self.path, self.errno or 0, self.default)


def _unavailable(path: str, number: int, default: bool) -> BrokerUnavailable:
    return BrokerUnavailable(path, number, default=default)
