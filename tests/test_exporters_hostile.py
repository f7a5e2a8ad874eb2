"""Attacks on and through exporters: each one written as what a hostile peer would send."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from typing import Any

import msgpack
import pytest

import bufbroker
from bufbroker import BrokerError, Direction, protocol

from conftest import Broker, RawClient

SIZE = 2 * 4096


def raw_exporter(broker: Broker, name: str, raw: Any) -> RawClient:
    """An exporter speaking by hand: hello as an exporter, export one buffer called ``name``."""
    client: RawClient = raw(broker)
    client.request(1, "hello", {"version": 1, "name": "raw-exporter", "exporter": True})
    assert client.recv()[2]["exporter"] is True
    client.request(2, "export", {"size": SIZE, "name": name})
    reply = client.recv()
    assert reply[0] == 1, reply
    return client


def next_call(client: RawClient) -> list[Any]:
    while True:
        message = client.recv()
        if message[0] == 4:
            return list(message)


def test_an_exporter_answering_with_too_many_descriptors_costs_only_that_call(
    broker_factory: Any, raw: Any
) -> None:
    broker = broker_factory("--exporter-call-timeout", "1")
    exporter = raw_exporter(broker, "greedy", raw)
    with broker.connect("importer") as dev:
        dev.ping()
        baseline = broker.fd_count()
        buf = dev.open("greedy")
        result: dict[str, int] = {}
        thread = threading.Thread(target=lambda: _attach(buf, result))
        thread.start()
        call = next_call(exporter)
        assert call[2] == "attach"
        pipes = [os.pipe() for _ in range(12)]
        fds = tuple(fd for pair in pipes for fd in pair)  # 24: more than max_fds_per_message
        exporter.send(msgpack.packb([5, call[1], {}]), fds)
        protocol.close_all(fds)
        thread.join(10)
        assert result == {"errno": errno.ETIMEDOUT}  # the answer never counted
        assert exporter.recv()[2]["code"] == "ETOOMANYREFS"
        dev.ping()
        broker.wait_for(lambda: broker.fd_count() <= baseline + 2)  # the buffer's own handles
        buf.close()
        broker.wait_for(lambda: broker.fd_count() <= baseline)


def _attach(buf: bufbroker.Buffer, result: dict[str, int]) -> None:
    try:
        buf.attach()
        result["ok"] = 1
    except BrokerError as e:
        result["errno"] = e.errno or 0


def test_answers_to_calls_never_made_are_dropped_and_closed(broker: Broker, raw: Any) -> None:
    exporter = raw_exporter(broker, "liar", raw)
    with broker.connect("importer") as dev:
        dev.ping()
        baseline = broker.fd_count()
        for id in (0, 1, 99, 2**62):
            memfd = os.memfd_create("stray")
            exporter.send(msgpack.packb([5, id, {}]), (memfd,))
            exporter.send(msgpack.packb([6, id, {"errno": 16, "code": "EBUSY", "message": "x"}]))
            os.close(memfd)
        exporter.request(3, "ping", {})
        assert exporter.recv()[:2] == [1, 3]  # still connected, nothing answered the strays
        broker.wait_for(lambda: broker.fd_count() <= baseline)


def test_an_importer_that_goes_while_its_map_waits_leaves_nothing(broker_factory: Any, raw: Any) -> None:
    broker = broker_factory("--exporter-call-timeout", "2")
    exporter = raw_exporter(broker, "slow", raw)
    observer = broker.connect("observer")
    baseline = broker.fd_count()
    dev = broker.connect("doomed")
    buf = dev.open("slow")
    thread = threading.Thread(target=lambda: _attach(buf, {}))
    thread.start()
    call = next_call(exporter)
    exporter.send(msgpack.packb([5, call[1], {}]))
    thread.join(10)
    (attachment,) = dev.buffers()[0]["attachments"]
    done: dict[str, int] = {}

    def map_it() -> None:
        try:
            dev._call(protocol.Map(attachment=attachment["id"], direction=Direction.TO_DEVICE))
        except BrokerError as e:
            done["errno"] = e.errno or 0

    mapper = threading.Thread(target=map_it)
    mapper.start()
    map_call = next_call(exporter)
    assert map_call[2] == "map"
    dev._sock.shutdown(socket.SHUT_RDWR)  # the importer's process goes, its map in flight
    mapper.join(10)
    dev.close()
    # The exporter hears the undo of what the importer held (its map had been counted).
    notices = [next_call(exporter)[2:] for _ in range(2)]
    assert [n[0] for n in notices] == ["unmap", "detach"]
    memfd = os.memfd_create("late", os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, SIZE)
    exporter.send(msgpack.packb([5, map_call[1], {}]), (memfd,))  # late: dropped, closed
    os.close(memfd)
    observer.ping()
    broker.wait_for(lambda: broker.fd_count() <= baseline + 2)
    observer.close()


def test_a_device_that_never_reads_its_events_is_cut_off(
    broker_factory: Any, exporter: Any, raw: Any
) -> None:
    broker = broker_factory("--max-queued-events", "4")
    peer = exporter(broker, "chatty")
    deaf = raw(broker)
    deaf.request(1, "hello", {"version": 1, "name": "deaf"})
    deaf.recv()
    deaf.request(2, "open", {"name": "chatty"})
    buffer = deaf.recv()[2]["id"]
    deaf.request(3, "attach", {"buffer": buffer, "dynamic": True})
    assert deaf.recv()[0] == 1
    # Every move sends the deaf device an event it never reads, until its socket and queue fill.
    with broker.connect("watcher") as dev:
        moves = 0
        while any(d["name"] == "deaf" for d in dev.devices()):
            peer.send("move")
            while '"moved"' not in peer.line():
                pass  # the attach the exporter saw
            moves += 1
            assert moves < 5000
    assert moves > 4


def test_a_plain_hello_is_answered_as_before(broker: Broker, raw: Any) -> None:
    client = raw(broker)
    client.request(1, "hello", {"version": 1, "name": "x"})
    assert "exporter" not in client.recv()[2]  # a version-1 client sees nothing new


@pytest.mark.parametrize("op", ["revoke", "move"])
def test_revoke_and_move_of_an_unknown_buffer_are_eperm(broker: Broker, raw: Any, op: str) -> None:
    client = raw_exporter(broker, "mine", raw)
    client.request(5, op, {"buffer": 999})
    reply = client.recv()
    assert reply[2]["code"] == "EPERM"


def test_importers_racing_a_revoke_get_enodev_and_leave_nothing(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "contended")
    observer = broker.connect("observer")
    observer.ping()
    baseline = broker.fd_count()
    errors: list[int] = []
    maps = [0]
    started = threading.Barrier(4)

    def importer(n: int) -> None:
        with broker.connect(f"importer-{n}") as dev:
            buf = dev.open("contended")
            started.wait()
            try:
                while True:
                    with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
                        assert bytes(m.memory[:6]) == b"pool A"
                        maps[0] += 1
            except BrokerError as e:
                errors.append(e.errno or 0)
            buf.close()

    threads = [threading.Thread(target=importer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.5)
    peer.send("revoke")
    for t in threads:
        t.join(20)
    assert maps[0] > 0 and errors == [errno.ENODEV] * 3
    observer.ping()
    broker.wait_for(lambda: broker.fd_count() <= baseline)
    assert observer.buffers()[0]["revoked"] and observer.buffers()[0]["attachments"] == []
    observer.close()
