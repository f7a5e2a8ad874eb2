"""Quotas and limits: each gives its errno, and nothing else changes."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

import pytest

import bufbroker

from conftest import Broker, RawClient


def _errno(call: Callable[[], object]) -> int:
    with pytest.raises(bufbroker.BrokerError) as e:
        call()
    assert e.value.errno is not None
    return e.value.errno


def test_buffers_per_uid(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory("--max-buffers-per-uid", "2")
    with b.connect() as dev:
        first, _ = dev.allocate(4096), dev.allocate(4096)
        assert _errno(lambda: dev.allocate(4096)) == errno.EDQUOT
        assert len(dev.buffers()) == 2 and dev.stats()["usage"]["buffers"] == 2
        first.close()
        b.wait_for(lambda: len(dev.buffers()) == 1)
        dev.allocate(4096)


def test_bytes_per_uid_buffer_size_and_memory(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory("--max-bytes-per-uid", "64K", "--max-buffer-size", "32K", "--max-memory", "1M")
    with b.connect() as dev:
        assert _errno(lambda: dev.allocate(32 * 1024 + 1)) == errno.EINVAL
        dev.allocate(32 * 1024)
        dev.allocate(32 * 1024)
        assert _errno(lambda: dev.allocate(4096)) == errno.EDQUOT
        stats = dev.stats()
        assert stats["usage"]["bytes"] == 64 * 1024 and stats["buffers"] == 2
    c = broker_factory("--max-memory", "64K")
    with c.connect() as dev:
        dev.allocate(64 * 1024)
        assert _errno(lambda: dev.allocate(4096)) == errno.ENOMEM
        assert dev.stats()["bytes"] == 64 * 1024


def test_connections_per_uid(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory("--max-connections-per-uid", "2")
    one, two = b.connect("one"), b.connect("two")
    assert _errno(lambda: b.connect("three")) == errno.ECONNREFUSED
    two.close()
    b.wait_for(lambda: one.stats()["connections"] == 1)
    with b.connect("three") as three:
        three.ping()
    one.close()


def test_pending_requests_per_connection(
    broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient]
) -> None:
    b = broker_factory("--max-pending-requests", "2")
    c = raw(b)
    c.hello()
    c.request(1, "open", {"name": "a", "timeout": 30})
    c.request(2, "open", {"name": "b", "timeout": 30})
    time.sleep(0.2)
    c.request(3, "ping", {})
    reply = c.recv()
    assert reply[0] == 2 and reply[1] == 3 and reply[2]["errno"] == errno.EAGAIN
    with b.connect() as dev:  # the waits end when the names appear; the connection goes on
        dev.allocate(4096, name="a")
        dev.allocate(4096, name="b")
        answers = sorted((c.recv()[1], c.recv()[1]))
        assert answers == [1, 2]
    c.request(4, "ping", {})
    assert c.recv()[:2] == [1, 4]


def test_message_size(broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient]) -> None:
    b = broker_factory("--max-message-size", "1024")
    c = raw(b)
    c.hello()
    c.request(7, "ping", {"pad": "x" * 2000})
    reply = c.recv()
    assert reply[:2] == [2, 7] and reply[2]["errno"] == errno.EMSGSIZE
    c.request(8, "ping", {})
    assert c.recv()[:2] == [1, 8]


@pytest.mark.parametrize("extra", [0, 1, 2, 17])
@pytest.mark.parametrize("limit", [3, 4])  # odd: the kernel's control buffer holds one more
def test_fds_per_message_exactly_and_over(
    broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient], limit: int, extra: int
) -> None:
    b = broker_factory("--max-fds-per-message", str(limit))
    c = raw(b)
    c.hello()
    before = b.fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(limit + extra)]
    try:
        c.request(1, "ping", {}, tuple(fds))
        reply = c.recv()
    finally:
        for fd in fds:
            os.close(fd)
    if extra:
        assert reply[0] == 2 and reply[2]["errno"] == errno.ETOOMANYREFS
    else:
        assert reply[:2] == [1, 1]  # surplus fds on a valid request are closed, not kept
    b.wait_for(lambda: b.fd_count() == before)
    c.request(2, "ping", {})
    assert c.recv()[:2] == [1, 2]
    with b.connect("bystander") as other:
        other.ping()


def test_handshake_timeout(broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient]) -> None:
    b = broker_factory("--handshake-timeout", "0.3")
    c = raw(b)
    started = time.monotonic()
    assert c.recv() is None  # dropped without a word
    assert 0.2 < time.monotonic() - started < 5


def test_incomplete_connections(
    broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient]
) -> None:
    b = broker_factory("--max-incomplete-connections-per-uid", "3")
    with b.connect("watcher") as watcher:
        silent = [raw(b) for _ in range(3)]  # connected, never say hello
        # Each is counted as incomplete in the same step as it is counted as a connection.
        b.wait_for(lambda: watcher.stats()["connections"] == 1 + len(silent))
        extra = raw(b)
        refusal = extra.recv()
        assert refusal[0] == 2 and refusal[1] is None and refusal[2]["code"] == "EAGAIN", refusal
        assert refusal[2]["errno"] == errno.EAGAIN
        assert extra.recv() is None  # then closed
        assert _errno(lambda: b.connect("polite")) == errno.EAGAIN  # hello comes too late
        for c in silent:
            c.close()
        b.wait_for(lambda: watcher.stats()["connections"] == 1)
        with b.connect("polite") as polite:
            polite.ping()
            assert sorted(d["name"] for d in watcher.devices()) == ["polite", "watcher"]
