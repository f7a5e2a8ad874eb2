"""Who may read and write which buffers through the service, and who may call it at all.

Nothing is served until a name matches a read glob, and nothing is accepted until it matches a
write glob: a service started with no ``--allow`` exposes nothing. ``--allow`` gives both,
``--allow-read`` and ``--allow-write`` one each. The token check is a Flight
server middleware, so it runs before any method and answers UNAUTHENTICATED on its own.
"""

from __future__ import annotations

import errno
import fnmatch
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.flight as fl

from ..protocol import BrokerError

__all__ = ["Policy", "TokenCheck", "bearer"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Glob patterns (``fnmatch``, case-sensitive) of the names remotes may read and write."""

    read: Sequence[str] = ()
    write: Sequence[str] = ()

    def readable(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.read)

    def writable(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.write)

    def check_read(self, name: str) -> None:
        # The same answer whether or not such a buffer exists: the policy leaks no names.
        if not self.readable(name):
            raise BrokerError(
                errno.EACCES, f"{name!r} is not served here (no --allow or --allow-read matches it)"
            )

    def check_write(self, name: str) -> None:
        if not self.writable(name):
            raise BrokerError(
                errno.EACCES, f"{name!r} is not accepted here (no --allow or --allow-write matches it)"
            )


def bearer(token: str) -> tuple[bytes, bytes]:
    """The header a client sends to present ``token``."""
    return b"authorization", b"Bearer " + token.encode()


class _Passed(fl.ServerMiddleware):  # type: ignore[misc]
    pass


class TokenCheck(fl.ServerMiddlewareFactory):  # type: ignore[misc]
    """Refuses every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        if not token:
            raise ValueError("an empty token would let anyone in")
        self._expected = b"Bearer " + token.encode()

    def start_call(self, info: fl.CallInfo, headers: dict[str, list[str | bytes]]) -> _Passed:
        for value in headers.get("authorization", []):
            given = value.encode() if isinstance(value, str) else bytes(value)
            if hmac.compare_digest(given, self._expected):
                return _Passed()
        raise fl.FlightUnauthenticatedError("a valid token is required (authorization: Bearer ...)")
