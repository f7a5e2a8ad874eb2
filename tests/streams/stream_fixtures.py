"""Fixtures of the stream tests: peers running stream_peer.py's roles."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Peer

STREAM_PEER = str(Path(__file__).with_name("stream_peer.py"))


@pytest.fixture
def stream_peer() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def run(role: str, *args: object) -> Peer:
        peers.append(Peer.start(STREAM_PEER, role, *args))
        return peers[-1]

    yield run
    for p in peers:
        p.stop()


def said(peer: Peer) -> dict[str, Any]:
    """The peer's next JSON line."""
    value: dict[str, Any] = json.loads(peer.line())
    return value
