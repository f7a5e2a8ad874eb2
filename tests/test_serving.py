"""The trio server in this process, over a real socket: how connections take turns."""

from __future__ import annotations

import socket
from pathlib import Path

import trio
import trio.testing

from bufbroker.broker._config import Config
from bufbroker.broker._server import Server
from bufbroker.client.trio import Device, open_device


async def test_only_connections_with_work_count_as_awake(tmp_path: Path) -> None:
    """A connection waiting for its peer is not awake; one being served, or queued, is.

    The count decides whether a connection that has answered lets the others run before it
    looks for its peer's next request; a count that drifted would make every request pay for
    a trip through the scheduler, or none.
    """
    path = str(tmp_path / "broker.sock")
    server = Server(Config(), version="test")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        await listener.bind(path)
        listener.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            async with (
                open_device("a", socket=path) as a,
                open_device("b", socket=path) as b,
            ):
                await trio.testing.wait_all_tasks_blocked()
                assert server.awake.count == 0

                async def busy(device: Device) -> None:
                    async with trio.open_nursery() as calls:  # pipelined: many in flight at once
                        for _ in range(40):
                            calls.start_soon(device.ping)
                    buffer = await device.allocate(4096)
                    attachment = await buffer.attach()
                    await attachment.detach()
                    await buffer.close()

                async with trio.open_nursery() as clients:
                    clients.start_soon(busy, a)
                    clients.start_soon(busy, b)
                await trio.testing.wait_all_tasks_blocked()
                assert server.awake.count == 0
                assert server.connections == 2
            await trio.testing.wait_all_tasks_blocked()
            assert server.awake.count == 0 and server.connections == 0
            nursery.cancel_scope.cancel()
