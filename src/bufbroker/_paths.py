"""Where the broker's socket lives: one rule for the daemon, the clients and the CLI."""

from __future__ import annotations

import os

__all__ = ["ENV_SOCKET", "default_socket_path"]

ENV_SOCKET = "BUFBROKER_SOCKET"
SYSTEM_SOCKET = "/run/bufbroker/bufbroker.sock"


def default_socket_path() -> str:
    """``$BUFBROKER_SOCKET``, else the system socket for root, else the user's runtime dir."""
    if path := os.environ.get(ENV_SOCKET):
        return path
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return os.path.join(runtime, "bufbroker", "bufbroker.sock")
