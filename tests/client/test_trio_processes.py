"""The trio client across real processes, with the blocking client on the other side.

Run as a script, this module is a trio peer: ``python test_trio_processes.py ROLE ARGS...``,
the twin of tests/peer.py's blocking ``produce`` and ``consume`` roles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

import bufbroker
from bufbroker import Access, Direction
from bufbroker.client.trio import recv_handle, send_handle

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for peer.py
from conftest import Broker, Peer
from peer import pattern

# --- the trio peer's roles (run in a separate process)


def say(**values: object) -> None:
    print(json.dumps(values), flush=True)


async def trio_produce(path: str, fd: str, size: str) -> None:
    """Allocate, fill with a pattern, send a handle over socket fd, close everything, exit."""
    n = int(size)
    async with bufbroker.open_device("trio-producer", socket=path) as dev:
        buf = await dev.allocate(n, name="trio-made")
        async with buf.cpu_access(Access.WRITE) as mem:
            mem[:n] = pattern(n)
        handle = await buf.share()
        with trio.socket.from_stdlib_socket(socket.socket(fileno=int(fd))) as sock:
            await send_handle(sock, handle)
        os.close(handle)
        say(id=buf.id, sha=hashlib.sha256(pattern(n)).hexdigest())


async def trio_consume(path: str, fd: str, size: str) -> None:
    """Receive a handle, import, attach, map TO_DEVICE, report a digest of the bytes."""
    n = int(size)
    with trio.socket.from_stdlib_socket(socket.socket(fileno=int(fd))) as sock:
        handle = await recv_handle(sock)
    async with bufbroker.open_device("trio-consumer", socket=path) as dev:
        buf = await dev.import_handle(handle)
        os.close(handle)
        async with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            say(id=buf.id, sha=hashlib.sha256(m.memory[:n]).hexdigest(), readonly=m.memory.readonly)
        await buf.close()


# --- fixtures and tests


@pytest.fixture
def trio_peer() -> Iterator[Callable[..., Peer]]:
    """Runs this module as a trio peer process; each is stopped by its pid at teardown."""
    peers: list[Peer] = []

    def run(role: str, *args: object, pass_fds: tuple[int, ...] = ()) -> Peer:
        peers.append(Peer.start(__file__, role, *args, pass_fds=pass_fds))
        return peers[-1]

    yield run
    for p in peers:
        p.stop()


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


async def line(p: Peer) -> dict[str, object]:
    result: dict[str, object] = json.loads(await trio.to_thread.run_sync(p.line))
    return result


async def test_trio_producer_to_blocking_consumer(broker: Broker, peer: Callable[..., Peer]) -> None:
    size = 3 * 4096 + 5
    a, b = pair()
    consumer = peer("consume", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    b.close()
    async with bufbroker.open_device("producer-here", socket=broker.socket) as dev:
        buf = await dev.allocate(size)
        async with buf.cpu_access(Access.WRITE) as mem:
            mem[:size] = pattern(size)
        handle = await buf.share()
        with trio.socket.from_stdlib_socket(a) as ours:
            await send_handle(ours, handle)
        os.close(handle)
        seen = await line(consumer)
        assert seen == {"id": buf.id, "sha": hashlib.sha256(pattern(size)).hexdigest(), "readonly": True}
    consumer.finish()


async def test_blocking_producer_to_trio_consumer(broker: Broker, peer: Callable[..., Peer]) -> None:
    size = 5 * 4096
    a, b = pair()
    producer = peer("produce", broker.socket, a.fileno(), size, pass_fds=(a.fileno(),))
    a.close()
    made = await line(producer)
    producer.finish()  # the producer is gone: only the handle in flight keeps the buffer
    with trio.socket.from_stdlib_socket(b) as theirs:
        handle = await recv_handle(theirs)
    async with bufbroker.open_device("consumer-here", socket=broker.socket) as dev:
        buf = await dev.import_handle(handle)
        os.close(handle)
        assert buf.id == made["id"]
        async with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            assert hashlib.sha256(m.memory[:size]).hexdigest() == made["sha"]
            assert m.memory.readonly
        await buf.close()
        with trio.fail_after(5):
            while await dev.buffers():  # freed once the broker sees the last handle closed
                await trio.sleep(0.005)


async def test_trio_process_to_blocking_process(
    broker: Broker, peer: Callable[..., Peer], trio_peer: Callable[..., Peer]
) -> None:
    """Both sides in processes of their own; the trio producer exits before the import."""
    size = 2 * 4096 + 1
    a, b = pair()
    producer = trio_peer("trio_produce", broker.socket, a.fileno(), size, pass_fds=(a.fileno(),))
    a.close()
    made = await line(producer)
    producer.finish()
    consumer = peer("consume", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    b.close()
    seen = await line(consumer)
    assert seen == {"id": made["id"], "sha": made["sha"], "readonly": True}
    assert made["sha"] == hashlib.sha256(pattern(size)).hexdigest()
    consumer.finish()
    with broker.connect("inspector") as dev:
        broker.wait_for(lambda: dev.buffers() == [])


async def test_blocking_process_to_trio_process(
    broker: Broker, peer: Callable[..., Peer], trio_peer: Callable[..., Peer]
) -> None:
    size = 4096 * 4 - 3
    a, b = pair()
    consumer = trio_peer("trio_consume", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    b.close()
    producer = peer("produce", broker.socket, a.fileno(), size, pass_fds=(a.fileno(),))
    a.close()
    made = await line(producer)
    seen = await line(consumer)
    assert seen == {"id": made["id"], "sha": made["sha"], "readonly": True}
    producer.finish()
    consumer.finish()


async def test_readonly_handle_from_trio_limits_the_blocking_side(broker: Broker) -> None:
    """A read-only share attenuates: the importer may map TO_DEVICE only (EACCES otherwise)."""
    async with bufbroker.open_device("owner", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        async with buf.cpu_access(Access.WRITE) as mem:
            mem[:3] = b"abc"
        handle = await buf.share(readonly=True)

        def blocking_side() -> tuple[bytes, int | None]:
            with broker.connect("reader") as other:
                theirs = other.import_handle(handle)
                assert theirs.readonly
                with theirs.attach() as att:
                    with att.map(Direction.TO_DEVICE) as m:
                        head = bytes(m.memory[:3])
                    with pytest.raises(bufbroker.BrokerError) as e:
                        att.map(Direction.FROM_DEVICE)
                return head, e.value.errno

        head, number = await trio.to_thread.run_sync(blocking_side)
        os.close(handle)
        assert (head, number) == (b"abc", errno.EACCES)


async def test_trio_and_blocking_write_the_same_buffer(broker: Broker) -> None:
    """Writes through one device's mapping are seen through the other's, both ways."""
    async with bufbroker.open_device("trio-side", socket=broker.socket) as dev:
        buf = await dev.allocate(2 * 4096)
        handle = await buf.share()
        async with buf.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
            m.memory[:5] = b"trio!"

            def blocking_side() -> bytes:
                with broker.connect("sync-side") as other:
                    theirs = other.import_handle(handle)
                    with theirs.cpu_access(Access.RW) as mem:
                        seen = bytes(mem[:5])
                        mem[4096 : 4096 + 4] = b"sync"
                    theirs.close()
                return seen

            assert await trio.to_thread.run_sync(blocking_side) == b"trio!"
            assert bytes(m.memory[4096 : 4096 + 4]) == b"sync"
        os.close(handle)
        await buf.close()


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    trio.run(globals()[role], *arguments)
