"""The trio client's seal, sealed open and heaps: the blocking client's twins."""

from __future__ import annotations

import errno

import pytest
import trio

import bufbroker
from bufbroker import Access

from conftest import Broker


def test_trio_seals_waits_for_sealed_and_lists_heaps(broker: Broker) -> None:
    async def main() -> None:
        async with (
            bufbroker.open_device("maker", socket=broker.socket) as maker,
            bufbroker.open_device("getter", socket=broker.socket) as getter,
        ):
            heaps = await maker.heaps()
            assert [h["name"] for h in heaps] == ["memfd", "hugetlb", "shm"]
            got: list[bufbroker.client.trio.Buffer] = []

            async def get() -> None:
                got.append(await getter.open("out", sealed=True, timeout=10))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(get)
                buf = await maker.allocate(1000, name="out", sealable=True)
                async with buf.cpu_access(Access.WRITE) as mem:
                    mem[:] = b"\x05" * 1000
                await trio.sleep(0.05)
                assert not got
                await buf.seal()
                assert buf.sealed
            [mine] = got
            assert (mine.size, mine.sealed) == (1000, True)
            async with mine.cpu_access(Access.READ) as mem:
                assert bytes(mem) == b"\x05" * 1000
            with pytest.raises(bufbroker.BrokerError) as e:
                await mine.cpu_access(Access.WRITE).begin()
            assert e.value.errno == errno.EPERM

    trio.run(main)
