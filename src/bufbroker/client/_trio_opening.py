"""``await op(...)`` or ``async with op(...)``: how the trio client hands out what it opens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

from ..protocol import BrokerError
from ._core import unclosed

__all__ = ["AsyncClosing", "Opening"]

T = TypeVar("T", bound="AsyncClosing")


class AsyncClosing:
    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            await self.close()
        except BrokerError as failure:
            unclosed(error, failure)

    async def close(self) -> None:
        raise NotImplementedError


class Opening(Generic[T]):
    """``await op(...)`` or ``async with op(...) as x``: the result, closed on exit if entered.

    The same two spellings as ``trio.open_file`` (awaited) and ``trio.open_nursery``
    (entered); ``async with await op(...)`` works too, since the result is itself an async
    context manager.
    """

    def __init__(self, start: Callable[[], Awaitable[T]]) -> None:
        self._start = start
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._start().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._start()
        return self._value

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        assert self._value is not None
        await self._value.__aexit__(kind, error, tb)
