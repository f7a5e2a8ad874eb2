"""A peer that dies (kill -9) loses everything it held; everybody else carries on."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

from bufbroker import Access

from conftest import Broker, Peer


def test_kill_9_of_a_client_holding_mappings(broker: Broker, peer: Callable[..., Peer]) -> None:
    holder = peer("hold", broker.socket, "victim")
    held = json.loads(holder.line())
    with broker.connect("survivor") as dev:
        shared = dev.open("victim")  # shared with the survivor: it must stay intact
        mine = dev.allocate(4096)
        devices = {d["name"] for d in dev.devices()}
        assert devices == {"holder", "survivor"}
        [entry] = [b for b in dev.buffers() if b["id"] == held["id"]]
        assert entry["attachments"][0]["map_count"] == 1 and entry["cpu_access"]

        os.kill(holder.proc.pid, signal.SIGKILL)
        holder.proc.wait()

        broker.wait_for(lambda: {d["name"] for d in dev.devices()} == {"survivor"})
        [entry] = [b for b in dev.buffers() if b["id"] == held["id"]]
        assert entry["attachments"] == [] and entry["cpu_access"] == []
        assert [i["name"] for i in entry["importers"]] == ["survivor"]
        with shared.cpu_access(Access.READ) as mem:
            assert bytes(mem[:4]) == b"mine"
        shared.close()
        broker.wait_for(lambda: [b["id"] for b in dev.buffers()] == [mine.id])
        assert dev.stats()["usage"]["buffers"] == 1
