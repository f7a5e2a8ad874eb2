"""What ``bufbroker ls``, ``show`` and ``devices`` say about exporters, their calls and moves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bufbroker import BrokerError, Direction

from conftest import Broker

CLI = [sys.executable, "-c", "from bufbroker.cli import main; raise SystemExit(main())"]


def cli(broker: Broker, *args: str) -> str:
    env = {**os.environ, "BUFBROKER_SOCKET": broker.socket, "NO_COLOR": "1"}
    out = subprocess.run([*CLI, *args], text=True, timeout=60, env=env, capture_output=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_listings_show_the_exporter_its_pending_calls_and_dynamic_attachments(
    broker_factory: Any, exporter: Any
) -> None:
    broker = broker_factory("--exporter-call-timeout", "3")
    peer = exporter(broker, "slowpoke", "stall", STALL="2")
    with broker.connect("importer") as dev:
        buf = dev.open("slowpoke")
        att = buf.attach(on_move=lambda att: None)
        failed: list[int] = []

        def map_it() -> None:
            try:
                att.map(Direction.TO_DEVICE).unmap()
            except BrokerError as e:
                failed.append(e.errno or 0)

        thread = threading.Thread(target=map_it)
        thread.start()
        try:
            time.sleep(0.3)  # the map waits on the exporter
            entry = json.loads(cli(broker, "show", str(buf.id), "--json"))
            assert entry["exporter"]["supplies"] and entry["heap"] == "exporter"
            assert [c["op"] for c in entry["pending_calls"]] == ["map"]
            assert entry["attachments"][0]["dynamic"]
            text = cli(broker, "show", str(buf.id))
            assert "supplies the memory" in text and "calls to the exporter:" in text
            devices = {d["name"]: d for d in json.loads(cli(broker, "devices", "--json"))}
            assert devices["exporter"]["calls"] == 1 and devices["importer"]["calls"] is None
        finally:
            thread.join(10)
        assert failed == []
        os.kill(peer.proc.pid, signal.SIGKILL)
        peer.proc.wait()
        broker.wait_for(lambda: buf.id in [b["id"] for b in dev.buffers() if b["revoked"]])
        (row,) = json.loads(cli(broker, "ls", "--json"))
        assert row["exporter"]["revoked"]
        assert ",revoked" in cli(broker, "ls")
        assert "revoked: no new attach" in cli(broker, "show", str(buf.id))
        att.detach()
        buf.close()
