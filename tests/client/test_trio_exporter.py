"""The trio client as an exporter (async methods, in its nursery) and as a dynamic importer."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from typing import Any

import trio

import bufbroker
from bufbroker import Access, Direction

from conftest import Broker

SIZE = 4096


def sealed(text: bytes) -> int:
    fd = os.memfd_create("trio-exporter", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, text, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class AsyncExporter(bufbroker.Exporter):
    def __init__(self) -> None:
        self.memory = sealed(b"from trio")
        self.seen: list[str] = []

    async def attach(self, attachment: bufbroker.ExporterAttachment) -> None:  # type: ignore[override]
        await trio.sleep(0.01)  # a coroutine: awaited in the device's nursery
        self.seen.append(f"attach {attachment.device}")

    async def map(self, attachment: bufbroker.ExporterAttachment, direction: Direction) -> int:  # type: ignore[override]
        await trio.sleep(0.01)
        self.seen.append(f"map {direction.value}")
        return self.memory

    def unmap(self, attachment: bufbroker.ExporterAttachment) -> None:
        self.seen.append("unmap")

    def detach(self, attachment: bufbroker.ExporterAttachment) -> None:
        self.seen.append("detach")

    def release(self, buffer: int) -> None:
        self.seen.append("release")


def test_a_trio_exporter_serves_an_importer_process(broker: Broker, peer: Any) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    consumer = peer("consume", broker.socket, theirs.fileno(), 9, pass_fds=(theirs.fileno(),))
    theirs.close()
    exporter = AsyncExporter()

    async def main() -> None:
        async with bufbroker.open_device("trio-exporter", socket=broker.socket, exporter=exporter) as dev:
            buf = await dev.export(SIZE, name="trio-exported")
            handle = await buf.share(readonly=True)
            bufbroker.send_handle(ours, handle)
            os.close(handle)
            seen = json.loads(await trio.to_thread.run_sync(consumer.line))
            assert seen["sha"] == hashlib.sha256(b"from trio").hexdigest() and seen["readonly"]
            await trio.to_thread.run_sync(consumer.finish)
            await buf.close()
            with trio.fail_after(5):
                while "release" not in exporter.seen:
                    await trio.sleep(0.01)

    try:
        trio.run(main)
    finally:
        ours.close()
        os.close(exporter.memory)
    assert exporter.seen == ["attach consumer", "map to_device", "unmap", "detach", "release"]


def test_a_trio_importer_maps_again_when_the_exporter_moves(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "trio-moving")

    async def main() -> None:
        async with bufbroker.open_device("trio-importer", socket=broker.socket) as dev:
            buf = await dev.open("trio-moving")
            mappings: dict[int, Any] = {}
            moved = trio.Event()

            async def on_move(att: Any) -> None:
                await mappings[att.id].unmap()
                mappings[att.id] = await att.map(Direction.TO_DEVICE)
                moved.set()

            att = await buf.attach(on_move=on_move)
            mappings[att.id] = await att.map(Direction.TO_DEVICE)
            assert bytes(mappings[att.id].memory[:6]) == b"pool A"
            peer.send("move 2")
            with trio.fail_after(5):
                await moved.wait()
            assert bytes(mappings[att.id].memory[:6]) == b"pool B"
            async with buf.cpu_access(Access.READ) as mem:
                assert bytes(mem[:6]) == b"pool B"
            await mappings[att.id].unmap()
            await att.detach()

    trio.run(main)
    lines = [json.loads(peer.line()) for _ in range(7)]
    moved = next(line for line in lines if "moved" in line)
    assert moved["late"] == []
