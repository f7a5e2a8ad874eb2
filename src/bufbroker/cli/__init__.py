"""The ``bufbroker`` inspection command: who holds what, in tables or JSON."""

from ._main import main

__all__ = ["main"]
