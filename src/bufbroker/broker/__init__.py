"""The daemon: the state model (no I/O), the heap, the handle table and the trio server."""

from ._config import Config
from ._server import Server
from ._state import State

__all__ = ["Config", "Server", "State"]
