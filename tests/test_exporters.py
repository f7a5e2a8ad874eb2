"""Exporters in client processes, across real processes: a real broker, an exporter process
(exporter_peer.py) and importers, here and in peer processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

import bufbroker
from bufbroker import Access, BrokerError, Direction, protocol

from conftest import Broker, Peer

SIZE = 2 * 4096


def said(peer: Peer) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(peer.line())
    return result


def calls(peer: Peer, n: int) -> list[tuple[str, ...]]:
    """The next ``n`` calls the exporter saw, as (op, detail) pairs."""
    seen = []
    for _ in range(n):
        line = said(peer)
        seen.append((line["call"], line.get("direction") or line.get("access") or ""))
    return seen


def test_importers_read_the_exporters_bytes(broker: Broker, exporter: Any, peer: Any) -> None:
    exporter(broker, "frames")
    with broker.connect("reader") as dev:
        buf = dev.open("frames")
        assert buf.exporter == "exporter" and buf.size == SIZE
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            assert bytes(m.memory[:6]) == b"pool A"
            assert m.memory.readonly  # a read-only descriptor, made by the broker
        # Another process, through a read-only handle, reads the same bytes.
        handle = buf.share(readonly=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        consumer = peer("consume", broker.socket, theirs.fileno(), 6, pass_fds=(theirs.fileno(),))
        theirs.close()
        bufbroker.send_handle(ours, handle)
        os.close(handle)
        ours.close()
        seen = json.loads(consumer.line())
        assert seen["sha"] == hashlib.sha256(b"pool A").hexdigest() and seen["readonly"]
        consumer.finish()
        buf.close()


def test_the_exporter_sees_each_op_in_order(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "ordered")
    with broker.connect("importer") as dev:
        buf = dev.open("ordered")
        att = buf.attach()
        mapping = att.map(Direction.FROM_DEVICE)
        mapping.memory[6:9] = b"!!!"  # writable: FROM_DEVICE writes
        mapping.unmap()
        att.detach()
        with buf.cpu_access(Access.READ) as mem:
            assert bytes(mem[:9]) == b"pool A!!!"
        buf.close()
    assert calls(peer, 6) == [
        ("attach", ""),
        ("map", "from_device"),
        ("unmap", ""),
        ("detach", ""),
        ("begin_cpu_access", "read"),
        ("end_cpu_access", "read"),
    ]
    peer.send("close")  # the last hold goes: the exporter is told to release (as its reply comes)
    assert sorted(map(json.dumps, [said(peer), said(peer)])) == sorted(
        map(json.dumps, [{"call": "release", "buffer": 1}, {"closed": True}])
    )


def test_an_importer_that_goes_is_torn_down_at_the_exporter(broker: Broker, exporter: Any) -> None:
    ex = exporter(broker, "held")
    dev = broker.connect("doomed")
    buf = dev.open("held")
    att = buf.attach()
    att.map(Direction.TO_DEVICE)
    dev.close()  # the connection ends with everything held
    assert calls(ex, 4) == [("attach", ""), ("map", "to_device"), ("unmap", ""), ("detach", "")]


def test_a_refusing_exporter_fails_attach_with_its_errno(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "busy", "refuse")
    with broker.connect("importer") as dev:
        buf = dev.open("busy")
        with pytest.raises(BrokerError) as e:
            buf.attach()
        assert e.value.errno == errno.EBUSY and "busy" in str(e.value)
        (entry,) = dev.buffers()
        assert entry["attachments"] == []
        buf.close()  # nothing left attached: the release works
    assert calls(peer, 1) == [("attach", "")]
    peer.send("quit")
    peer.finish()  # no detach was told for an attach it refused: nothing more was printed


@pytest.mark.parametrize("mode", ["pipe", "unsealed", "wrongsize", "twofds", "badsegments"])
def test_a_garbage_answer_is_eio_and_harms_nobody(broker: Broker, exporter: Any, mode: str) -> None:
    peer = exporter(broker, "garbage", mode)
    with broker.connect("importer") as dev:
        dev.ping()
        baseline = broker.fd_count()
        buf = dev.open("garbage")
        att = buf.attach()
        with pytest.raises(BrokerError) as e:
            att.map(Direction.TO_DEVICE)
        assert e.value.errno == errno.EIO
        with pytest.raises(BrokerError) as e:
            buf.cpu_access(Access.READ).begin()
        assert e.value.errno == errno.EIO
        att.detach()  # the failed map left nothing mapped
        buf.close()
        dev.ping()
        broker.wait_for(lambda: broker.fd_count() == baseline)
    seen = [said(peer) for _ in range(7)]
    # The exporter is told what was wrong, and of the unmap its map needed after all.
    assert [s["call"] for s in seen] == [
        "attach",
        "map",
        "error",
        "unmap",
        "begin_cpu_access",
        "error",
        "end_cpu_access",
    ]
    assert seen[2]["errno"] == errno.EIO


def _pings(dev: bufbroker.Device, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        dev.ping()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_a_stalled_exporter_times_out_while_others_stay_fast(broker_factory: Any, exporter: Any) -> None:
    broker = broker_factory("--exporter-call-timeout", "1")
    exporter(broker, "stalled", "stall", STALL="2")
    with broker.connect("importer") as dev, broker.connect("bystander") as other:
        buf = dev.open("stalled")
        att = buf.attach()
        quiet = _pings(other, 200)
        outcome: dict[str, Any] = {}

        def map_it() -> None:
            started = time.monotonic()
            try:
                att.map(Direction.TO_DEVICE)
            except BrokerError as e:
                outcome["errno"] = e.errno
            outcome["seconds"] = time.monotonic() - started

        baseline = broker.fd_count()
        thread = threading.Thread(target=map_it)
        thread.start()
        time.sleep(0.1)
        stalled = _pings(other, 200)
        thread.join(10)
        assert outcome["errno"] == errno.ETIMEDOUT
        assert 0.9 <= outcome["seconds"] < 5
        assert stalled / quiet < 5, (stalled, quiet)  # the stall is not on the broker's loop
        # The late answer (a memfd) is dropped and its descriptor closed.
        time.sleep(1.5)
        dev.ping()
        broker.wait_for(lambda: broker.fd_count() <= baseline)
        att.detach()
        buf.close()


def test_calls_in_flight_per_exporter_are_capped(broker_factory: Any, exporter: Any) -> None:
    broker = broker_factory("--exporter-call-timeout", "2", "--max-exporter-calls", "1")
    exporter(broker, "capped", "stall", STALL="1")
    with broker.connect("first") as first, broker.connect("second") as second:
        a = first.open("capped").attach()
        b = second.open("capped").attach()
        thread = threading.Thread(target=lambda: a.map(Direction.TO_DEVICE).unmap())
        thread.start()
        time.sleep(0.3)
        with pytest.raises(BrokerError) as e:
            b.map(Direction.TO_DEVICE)
        assert e.value.errno == errno.EAGAIN
        thread.join(10)


def test_sigkill_of_the_exporter_revokes_its_buffers(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "doomed")
    with broker.connect("importer") as dev:
        dev.ping()
        baseline = broker.fd_count()
        buf = dev.open("doomed")
        att = buf.attach()
        mapping = att.map(Direction.TO_DEVICE)
        os.kill(peer.proc.pid, signal.SIGKILL)
        peer.proc.wait()
        broker.wait_for(lambda: not any(d["name"] == "exporter" for d in dev.devices()))
        assert bytes(mapping.memory[:6]) == b"pool A"  # still readable: size seals, no SIGBUS
        for new in (
            lambda: att.map(Direction.TO_DEVICE),
            lambda: buf.attach(),
            lambda: buf.cpu_access().begin(),
        ):
            with pytest.raises(BrokerError) as e:
                new()
            assert e.value.errno == errno.ENODEV
        assert buf.revoked  # the "revoked" event came
        (entry,) = dev.buffers()
        assert entry["revoked"] and entry["exporter"]["name"] == "exporter"
        mapping.unmap()
        att.detach()
        buf.close()
        assert dev.buffers() == []
        broker.wait_for(lambda: broker.fd_count() <= baseline)


def test_revoke_by_the_exporter(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "taken")
    with broker.connect("importer") as dev:
        buf = dev.open("taken")
        att = buf.attach()
        mapping = att.map(Direction.TO_DEVICE)
        peer.send("revoke")
        assert calls(peer, 2) == [("attach", ""), ("map", "to_device")]
        assert said(peer) == {"revoked": True}
        with pytest.raises(BrokerError) as e:
            att.map(Direction.TO_DEVICE)
        assert e.value.errno == errno.ENODEV
        assert bytes(mapping.memory[:6]) == b"pool A"
        mapping.unmap()
        att.detach()
        buf.close()


def test_move_with_two_dynamic_importers_one_slow(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "moving")
    remapped = {"prompt": threading.Event(), "slow": threading.Event()}
    with broker.connect("prompt") as fast_dev, broker.connect("slow") as slow_dev:
        mappings: dict[str, bufbroker.Mapping] = {}

        def remap(key: str, delay: float) -> Callable[[bufbroker.Attachment], None]:
            def on_move(att: bufbroker.Attachment) -> None:
                time.sleep(delay)
                mappings[key].unmap()
                mappings[key] = att.map(Direction.TO_DEVICE)
                remapped[key].set()

            return on_move

        fast = fast_dev.open("moving").attach(on_move=remap("prompt", 0))
        slow = slow_dev.open("moving").attach(on_move=remap("slow", 3))
        mappings["prompt"] = fast.map(Direction.TO_DEVICE)
        mappings["slow"] = slow.map(Direction.TO_DEVICE)
        assert calls(peer, 4) == [("attach", ""), ("attach", ""), ("map", "to_device"), ("map", "to_device")]
        peer.send("move 1")
        lines = [said(peer) for _ in range(4)]
        moved = next(line for line in lines if "moved" in line)
        assert [late["attachment"] for late in moved["late"]] == [slow.id]
        assert moved["seconds"] < 2.5
        assert remapped["prompt"].wait(5)
        assert bytes(mappings["prompt"].memory[:6]) == b"pool B"
        # The slow one gets there too, after the move reported it late.
        assert remapped["slow"].wait(10)
        assert bytes(mappings["slow"].memory[:6]) == b"pool B"
        (entry,) = fast_dev.buffers()
        assert all(a["dynamic"] for a in entry["attachments"])


def test_a_static_attachment_pins_the_buffer(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "pinned")
    with broker.connect("importer") as dev:
        buf = dev.open("pinned")
        att = buf.attach()  # static: no on_move
        peer.send("move")
        assert [said(peer) for _ in range(2)][-1] == {"moved": False, "errno": errno.EBUSY}
        att.detach()
        peer.send("move")
        lines = [said(peer) for _ in range(2)]  # printed by two threads of the exporter: any order
        assert {"call": "detach", "attachment": att.id} in lines and {"moved": True} in lines


def test_answers_from_a_device_that_is_no_exporter_are_a_protocol_error(broker: Broker, raw: Any) -> None:
    import msgpack

    client = raw(broker)
    client.hello()
    client.send(msgpack.packb([5, 1, {}]))
    reply = client.recv()
    assert reply[0] == 2 and reply[2]["code"] == "EPROTO"


def test_only_the_exporter_may_revoke_or_move(broker: Broker, exporter: Any) -> None:
    exporter(broker, "theirs")
    with broker.connect("importer") as dev:
        buf = dev.open("theirs")
        for op in (buf.revoke, buf.move):
            with pytest.raises(BrokerError) as e:
                op()
            assert e.value.errno == errno.EPERM
        with pytest.raises(BrokerError) as e:
            dev.export(4096)
        assert e.value.errno == errno.EOPNOTSUPP


def test_open_attach_and_map_of_an_exported_buffer_in_one_round_trip(
    broker: Broker, exporter: Any, raw: Any
) -> None:
    peer = exporter(broker, "pipelined")
    c = raw(broker)
    c.hello()
    c.request(1, "open", {"name": "pipelined"})
    c.request(2, "attach", {"buffer": {"ref": 1}})  # waits for the exporter's answer
    c.request(3, "map", {"attachment": {"ref": 2}, "direction": "to_device"})  # behind it, in order
    c.request(4, "cpu_begin", {"buffer": {"ref": 1}, "access": "read"})
    c.request(5, "attach", {"buffer": {"ref": 99}})  # refers to nothing
    replies = {}
    for _ in range(5):
        data, ancdata, flags, _ = c.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64))
        message = msgpack.unpackb(data)
        replies[message[1]] = (message, protocol.fds_from_ancillary(ancdata, flags, 16))
    assert [replies[i][0][0] for i in (1, 2, 3, 4)] == [1, 1, 1, 1], replies
    assert replies[5][0][2]["code"] == "EINVAL"
    (_, (fd,)), (_, (cpu_fd,)) = replies[3], replies[4]
    assert os.pread(fd, 6, 0) == b"pool A" == os.pread(cpu_fd, 6, 0)
    protocol.close_all([fd, cpu_fd, *replies[1][1]])
    seen = [call for call, _ in calls(peer, 3)]  # the cpu access waits for nothing: any order
    assert sorted(seen) == ["attach", "begin_cpu_access", "map"] and seen.index("attach") < seen.index("map")


def test_a_read_only_importer_gets_a_read_only_descriptor_and_no_write(broker: Broker, exporter: Any) -> None:
    peer = exporter(broker, "guarded")
    with broker.connect("owner") as owner, broker.connect("reader") as reader:
        handle = owner.open("guarded").share(readonly=True)
        buf = reader.import_handle(handle)
        os.close(handle)
        assert buf.readonly
        att = buf.attach()
        with pytest.raises(BrokerError) as e:
            att.map(Direction.FROM_DEVICE)  # refused by the broker: the exporter is not asked
        assert e.value.errno == errno.EACCES
        with att.map(Direction.TO_DEVICE) as m:
            (fd,) = m.fds()
            try:
                assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                with pytest.raises(PermissionError):
                    mmap.mmap(fd, SIZE, access=mmap.ACCESS_WRITE)
            finally:
                os.close(fd)
        att.detach()
    assert [call for call, _ in calls(peer, 4)] == ["attach", "map", "unmap", "detach"]
