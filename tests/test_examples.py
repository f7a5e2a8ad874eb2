"""The examples under examples/ run against a real broker and do what they say."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
from pathlib import Path

import bufbroker
from bufbroker import Access, BrokerError, Direction

from conftest import Broker

RING = str(Path(__file__).parents[1] / "examples" / "migrating_ring.py")


def test_the_ring_migrates_under_a_dynamic_importer_and_stays_under_a_static_one(broker: Broker) -> None:
    proc = subprocess.Popen(
        [sys.executable, RING, "--socket", broker.socket, "--frames", "2", "--size", "10000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert json.loads(proc.stdout.readline()) == {"ready": ["ring-0", "ring-1"]}
        with broker.connect("viewer") as dev:
            moving, pinned = dev.open("ring-0"), dev.open("ring-1")
            mappings: dict[int, bufbroker.Mapping] = {}
            remapped = threading.Event()

            def on_move(att: bufbroker.Attachment) -> None:
                mappings[att.id].unmap()
                mappings[att.id] = att.map(Direction.TO_DEVICE)
                remapped.set()

            dynamic = moving.attach(on_move=on_move)
            mappings[dynamic.id] = dynamic.map(Direction.TO_DEVICE)
            static = pinned.attach()
            mappings[static.id] = static.map(Direction.TO_DEVICE)
            assert bytes(mappings[dynamic.id].memory[:15]) == b"pool A frame 0 "

            proc.stdin.write("\n")
            proc.stdin.flush()
            report = json.loads(proc.stdout.readline())
            assert report == {
                "ring-0": {"pool": "B", "late": []},
                "ring-1": {"pool": "A", "pinned": True},
            }
            assert remapped.wait(5)
            assert bytes(mappings[dynamic.id].memory[:15]) == b"pool B frame 0 "
            assert bytes(mappings[static.id].memory[:15]) == b"pool A frame 1 "
            with moving.cpu_access(Access.READ) as mem:
                assert bytes(mem[:15]) == b"pool B frame 0 "
            for m in mappings.values():
                m.unmap()
            dynamic.detach()
            static.detach()
        proc.stdin.close()
        assert proc.wait(10) == 0
        # The exporter is gone: its buffers went with it (no holder was left).
        with broker.connect("after") as dev:
            try:
                dev.open("ring-0")
                raise AssertionError("ring-0 outlived its exporter and every holder")
            except BrokerError as e:
                assert e.errno == errno.ENOENT
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
