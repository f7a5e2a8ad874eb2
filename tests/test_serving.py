"""The trio server in this process, over a real socket: how connections take turns."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import msgpack
import trio
import trio.testing

from bufbroker.broker._config import Config
from bufbroker.broker._server import Server
from bufbroker.client.trio import Device, open_device


async def _serve(server: Server, path: str, nursery: trio.Nursery) -> trio.socket.SocketType:
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await listener.bind(path)
    listener.listen()
    await nursery.start(server.serve, listener)
    return listener


async def test_only_connections_with_work_count_as_awake(tmp_path: Path) -> None:
    """A connection waiting for its peer is not awake; one answering, or trying to, is.

    The count decides whether a connection that has answered lets the others run before it
    looks for its peer's next request; a count that drifted would make every request pay for
    a trip through the scheduler, or none.
    """
    path = str(tmp_path / "broker.sock")
    server = Server(Config(), version="test")
    async with trio.open_nursery() as nursery:
        listener = await _serve(server, path, nursery)
        async with open_device("a", socket=path) as a, open_device("b", socket=path) as b:
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

            # A peer that sends and never reads: its connection ends up waiting to send, awake.
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as greedy:
                greedy.setblocking(False)
                greedy.connect(path)
                greedy.send(msgpack.packb([0, 0, "hello", {"version": 1, "name": "greedy"}]))
                await trio.lowlevel.wait_readable(greedy)
                greedy.recv(4096)
                ping = msgpack.packb([0, 1, "ping", {}])
                sent = -1
                while sent:  # until the broker no longer reads: it is stuck sending
                    sent = 0
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            greedy.send(ping)
                            sent += 1
                    await trio.testing.wait_all_tasks_blocked()
                assert server.awake.count == 1
                nursery.cancel_scope.cancel()  # the server stops with it stuck, and b and a waiting
    listener.close()
    assert server.awake.count == 0 and server.connections == 0
