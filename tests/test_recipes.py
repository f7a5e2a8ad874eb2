"""The numpy, torch, pyarrow and PIL recipes of docs/CLIENT.md, run as written against a real
broker, each in its own process (torch's only where torch is installed: it is not among the
test dependencies, and its numpy half is the numpy recipe)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Broker

DOC = Path(__file__).parent.parent / "docs" / "CLIENT.md"


def recipes() -> dict[str, str]:
    section = DOC.read_text().split("## numpy, torch, pyarrow, PIL", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[1:]
    names = ("numpy", "torch", "pyarrow", "PIL")
    assert len(blocks) == len(names)
    return {name: block.split("```", 1)[0] for name, block in zip(names, blocks, strict=True)}


@pytest.mark.parametrize("name", ["numpy", "torch", "pyarrow", "PIL"])
def test_recipe_runs_as_written(broker: Broker, name: str) -> None:
    code = recipes()[name]
    if name == "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (an optional, heavy dependency)")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "BUFBROKER_SOCKET": broker.socket},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
