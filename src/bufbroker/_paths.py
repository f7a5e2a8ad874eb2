"""Where the broker's socket lives: one rule for the daemon, the clients and the CLI.

The rule: ``$BUFBROKER_SOCKET``, else the system socket for root,
else the user's own under ``$XDG_RUNTIME_DIR``. It depends on who asks, never on which sockets
exist: the daemon binds the path a client of the same user looks for, and a client whose own
broker is down gets an error naming that path rather than silently reaching another broker
(with other buffers, other limits). Members of the ``bufbroker`` group reach the system broker
by setting ``BUFBROKER_SOCKET=/run/bufbroker/bufbroker.sock`` (docs/SYSTEMD.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["ENV_SOCKET", "SYSTEM_SOCKET", "default_socket_path", "socket_path_for"]

ENV_SOCKET = "BUFBROKER_SOCKET"
SYSTEM_SOCKET = "/run/bufbroker/bufbroker.sock"


def socket_path_for(environ: Mapping[str, str], *, euid: int, uid: int) -> str:
    """The default socket for a process with this environment and these ids (pure)."""
    if path := environ.get(ENV_SOCKET):
        return path
    if euid == 0:
        return SYSTEM_SOCKET
    runtime = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    return os.path.join(runtime, "bufbroker", "bufbroker.sock")


def default_socket_path() -> str:
    """``$BUFBROKER_SOCKET``, else the system socket for root, else the user's runtime dir."""
    return socket_path_for(os.environ, euid=os.geteuid(), uid=os.getuid())
