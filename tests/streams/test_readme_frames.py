"""The README's producer and consumer, run as written, as two processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import Broker

README = Path(__file__).parent.parent.parent / "README.md"


def _example(first_line: str) -> str:
    """The README's Python block that starts with ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no example {first_line!r} in the README")


def test_the_readme_camera_and_viewer(broker: Broker, tmp_path: Path) -> None:
    for name in ("camera.py", "viewer.py"):
        (tmp_path / name).write_text(_example(f"# {name}"))
    env = {**os.environ, "BUFBROKER_SOCKET": broker.socket}

    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, name],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    viewer = start("viewer.py")
    try:
        camera = start("camera.py")
        try:
            _, err = camera.communicate(timeout=60)
            assert camera.returncode == 0, err
        finally:
            camera.kill()
            camera.wait()
        out, err = viewer.communicate(timeout=60)
        assert viewer.returncode == 0, err
    finally:
        viewer.kill()
        viewer.wait()
    rows = [tuple(map(int, line.split())) for line in out.splitlines()]
    seqs = [seq for seq, _, _ in rows]
    assert seqs and seqs == list(range(seqs[0], 101))  # joined at some frame, then every one
    assert all(size == 640 * 480 and grey == (seq - 1) % 256 for seq, size, grey in rows)
