"""Fixtures of the fence tests: peers running fence_peer.py's roles, and sockets to them."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Peer

FENCE_PEER = str(Path(__file__).with_name("fence_peer.py"))


@pytest.fixture
def fence_peer() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def run(role: str, *args: object, pass_fds: tuple[int, ...] = ()) -> Peer:
        peers.append(Peer.start(FENCE_PEER, role, *args, pass_fds=pass_fds))
        return peers[-1]

    yield run
    for p in peers:
        p.stop()


@pytest.fixture
def channel() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    """Unix socketpairs for handing handles and fences to peers; closed after the test."""
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        made.extend((ours, theirs))
        return ours, theirs

    yield make
    for s in made:
        s.close()
