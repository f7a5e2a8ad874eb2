"""``bufbroker heaps`` as a subprocess against a real broker, and its renderer on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bufbroker import Access
from bufbroker.cli._heaps import HEAP_COLUMNS, render_heaps

from conftest import Broker

_SCRIPT = Path(sys.executable).parent / "bufbroker"
CLI = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from bufbroker.cli import main; raise SystemExit(main())"]
)


def _run(broker: Broker, *args: str) -> str:
    env = {**os.environ, "BUFBROKER_SOCKET": broker.socket, "NO_COLOR": "1"}
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_heaps_shows_each_heap_and_what_it_holds(broker: Broker, huge_pages: Callable[..., None]) -> None:
    huge_pages(3)
    with broker.connect("camera") as dev:
        frame = dev.allocate(3 << 20, heap="hugetlb")
        with frame.cpu_access(Access.WRITE):
            pass
        dev.allocate(5000, heap="shm")
        heaps = {h["name"]: h for h in json.loads(_run(broker, "heaps", "--json"))}
        assert list(heaps) == ["memfd", "hugetlb", "shm"]
        hugetlb = heaps["hugetlb"]
        assert (hugetlb["page_size"], hugetlb["buffers"], hugetlb["bytes"], hugetlb["backed_bytes"]) == (
            2 << 20,
            1,
            4 << 20,
            4 << 20,
        )
        assert hugetlb["pool"] == {"pages": 3, "free_pages": 1, "overcommit_pages": 0}
        assert (heaps["shm"]["buffers"], heaps["shm"]["bytes"], heaps["shm"]["backed_bytes"]) == (1, 8192, 0)
        lines = _run(broker, "heaps").splitlines()
        assert lines[0].split() == list(HEAP_COLUMNS)
        assert lines[2].split()[:10] == ["hugetlb", "2.0", "MiB", "yes", "1", "4.0", "MiB", "4.0", "MiB", "3"]


def test_an_unavailable_heap_says_why_without_escapes() -> None:
    text = render_heaps(
        [
            {
                "name": "hugetlb",
                "page_size": 2 << 20,
                "available": False,
                "reason": "no pages\x1b[31m",
                "buffers": 0,
                "bytes": 0,
                "backed_bytes": 0,
                "pool": {},
            }
        ],
        legend=False,
    )
    assert "\x1b" not in text and text.endswith("no pages\\x1b[31m")
