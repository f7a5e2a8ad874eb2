"""The short modes of the reliability drivers in tools/ (the long modes: docs/RELIABILITY.md)."""

from __future__ import annotations

import os
import signal
import socket
import time

import msgpack

from tools import chaos, fuzz, load
from tools._common import Target

from conftest import Broker

RSS_SLACK_KIB = 4096  # the allocator keeps some freed memory; a leak would grow with the run


def _target(broker: Broker) -> Target:
    return Target(broker.socket, broker.pid)


def test_fuzz_short(broker_factory) -> None:  # type: ignore[no-untyped-def]
    # Answers that never come (too many descriptors, a stray id) cost the importer this long.
    broker = broker_factory("--exporter-call-timeout", "0.3")
    report = fuzz.run(_target(broker), frames=3000, clients=3, seed=11)
    assert report.good_errors == [] and report.good_ops > 0
    assert report.frames == 3000 and report.disconnects > 0 and report.fds_sent > 0
    assert report.dead_handles_sent > 0  # and none of them imported (good_errors)
    assert report.exporter.calls > 0 and report.exporter.maps > 0  # and no lie reached the importer
    assert report.broker_fds[1] == report.broker_fds[0]
    assert report.broker_rss_kib[1] - report.broker_rss_kib[0] < RSS_SLACK_KIB
    assert broker.proc.poll() is None


def test_chaos_short(broker: Broker) -> None:
    report = chaos.run(_target(broker), kills=8, workers=3, seed=5)
    assert report.kills == 8 and report.worker_ops > 0
    assert report.waits_ended == 8 and report.waits_wrong == []  # every killed signaller's waiter woke
    assert report.leftovers == 0
    assert report.survivor_intact
    assert report.stream_intact and report.stream_frames > 0
    assert report.broker_fds[1] == report.broker_fds[0]


def test_load_short(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory("--max-connections-per-uid", "64")
    report = load.run(_target(broker), clients=12, seconds=3)
    assert report.errors == [] and report.ops > 0
    assert report.broker_fds[1] == report.broker_fds[0]
    assert report.broker_rss_kib[2] - report.broker_rss_kib[0] < RSS_SLACK_KIB


def test_a_flooder_that_never_reads_is_held_back_and_others_are_served(broker: Broker) -> None:
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    flooder.connect(broker.socket)
    flooder.send(msgpack.packb([0, 0, "hello", {"version": 1, "name": "flooder"}]))
    flooder.setblocking(False)
    request = msgpack.packb([0, 1, "stats", {}])  # replies larger than requests
    rss0 = Target(broker.socket, broker.pid).rss_kib()
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            flooder.send(request)
            sent += 1
        except BlockingIOError:
            break  # the kernel pushed back: the broker stopped reading this connection
    assert time.monotonic() < deadline, "the flooder was never held back"
    with broker.connect("bystander") as dev:
        for _ in range(50):
            dev.ping()
        assert any(d["name"] == "flooder" for d in dev.devices())
    assert Target(broker.socket, broker.pid).rss_kib() - rss0 < RSS_SLACK_KIB
    flooder.close()


def test_connection_limit_refuses_one_uid_not_another(broker_factory, peer, other_uid: int) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory("--max-connections-per-uid", "3")
    mine = [broker.connect(f"mine{i}") for i in range(3)]
    try:
        refused = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        refused.connect(broker.socket)
        refused.settimeout(5)
        error = msgpack.unpackb(refused.recv(4096))
        assert error[0] == 2 and error[2]["code"] == "ECONNREFUSED"
        refused.close()
        stranger = peer("open_as", broker.socket, other_uid, "missing")  # another uid: still welcome
        assert stranger.line() == '{"opened": false, "errno": 2}'
        stranger.finish()
    finally:
        for dev in mine:
            dev.close()


def test_a_client_killed_mid_request_costs_nothing(broker: Broker) -> None:
    pid = os.fork()
    if pid == 0:  # a child that sends half a conversation and dies
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(broker.socket)
            s.send(msgpack.packb([0, 0, "hello", {"version": 1, "name": "dying"}]))
            s.send(msgpack.packb([0, 1, "open", {"name": "never", "timeout": 60}]))
            time.sleep(60)
        finally:
            os._exit(0)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with broker.connect("after") as dev:
        broker.wait_for(lambda: [d["name"] for d in dev.devices()] == ["after"])
