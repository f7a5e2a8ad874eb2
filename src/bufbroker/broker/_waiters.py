"""Opens that wait for a name, indexed by the name they wait for.

A name that appears wakes the opens waiting for that very name and nobody else: thousands of
waiting opens cost a named allocate or a rename nothing, where one parking lot for all would
wake them all every time (a herd that held everyone else up for hundreds of milliseconds).
"""

from __future__ import annotations

import trio

__all__ = ["NameWaiters"]

NameKey = tuple[int, str]  # (owner uid, name): each uid has its own names


class NameWaiters:
    def __init__(self) -> None:
        self._lots: dict[NameKey, trio.lowlevel.ParkingLot] = {}

    def __len__(self) -> int:
        return sum(len(lot) for lot in self._lots.values())

    async def wait(self, key: NameKey) -> None:
        """Wait until ``appeared(key)``; the caller checks again (the name may be gone by then)."""
        lot = self._lots.setdefault(key, trio.lowlevel.ParkingLot())
        try:
            await lot.park()
        finally:
            if not lot and self._lots.get(key) is lot:
                del self._lots[key]

    def appeared(self, key: NameKey) -> None:
        lot = self._lots.get(key)
        if lot is not None:
            lot.unpark_all()
