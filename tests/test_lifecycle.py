"""The dma-buf lifecycle across real processes: share, import, map, and the lifetime rule."""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Access, Direction

from conftest import Broker, Peer
from peer import pattern


def test_a_writes_b_reads_across_a_plain_socketpair(broker: Broker, peer: Callable[..., Peer]) -> None:
    a, b = socket.socketpair()
    size = 3 * 4096 + 100
    producer = peer("produce", broker.socket, a.fileno(), size, pass_fds=(a.fileno(),))
    consumer = peer("consume", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    a.close()
    b.close()
    made, seen = json.loads(producer.line()), json.loads(consumer.line())
    producer.finish()
    consumer.finish()
    assert made["sha"] == seen["sha"]
    assert made["id"] == seen["id"]
    assert seen["readonly"] is True  # TO_DEVICE maps read-only


def test_handle_outlives_its_sender_and_buffer_dies_with_last_holder(
    broker: Broker, peer: Callable[..., Peer]
) -> None:
    a, b = socket.socketpair()
    producer = peer("produce", broker.socket, a.fileno(), 8192, pass_fds=(a.fileno(),))
    a.close()
    made = json.loads(producer.line())
    producer.finish()  # the producer has exited: its device and its own handle are gone
    with broker.connect("observer") as dev:
        # The handle is still in flight inside the socketpair: the buffer must live.
        assert [x["id"] for x in dev.buffers()] == [made["id"]]
        handle = bufbroker.recv_handle(b)
        buf = dev.import_handle(handle)
        os.close(handle)
        with buf.cpu_access(Access.READ) as mem:
            assert bytes(mem[:8]) == pattern(8192)[:8]
        broker.wait_for(lambda: dev.buffers()[0]["handles"] == 0)  # every copy is closed (async)
        buf.close()
        broker.wait_for(lambda: dev.buffers() == [])
    b.close()


def test_closing_the_last_handle_frees_an_unheld_buffer(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        extra = buf.share()
        buf.close()  # the device lets go, its own handle closes; `extra` still holds it
        assert [x["handles"] for x in dev.buffers()] == [1]
        os.close(extra)
        broker.wait_for(lambda: dev.buffers() == [])


def test_new_buffers_read_as_zeros_and_keep_the_size_asked_for(broker: Broker) -> None:
    with broker.connect() as dev:
        with pytest.raises(bufbroker.BrokerError) as e:
            dev.allocate(0)
        assert e.value.errno == errno.EINVAL
        one = dev.allocate(1)
        assert one.size == 1
        big = dev.allocate(5 * 4096 + 1)
        assert big.size == 5 * 4096 + 1
        with big.cpu_access(Access.READ) as mem:
            assert len(mem) == 5 * 4096 + 1
            assert bytes(mem) == bytes(5 * 4096 + 1)
        [listed] = [b for b in dev.buffers() if b["id"] == big.id]
        assert (listed["size"], listed["span"]) == (5 * 4096 + 1, 6 * 4096)  # backing: whole pages
        assert dev.stats()["usage"]["bytes"] == 4096 + 6 * 4096  # quotas count the backing


def test_map_rules(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        att = buf.attach()
        m1 = att.map(Direction.TO_DEVICE)
        m2 = att.map(Direction.TO_DEVICE)  # same direction: same segments, count + 1
        assert m1.segments == m2.segments
        assert dev.buffers()[0]["attachments"][0]["map_count"] == 2
        with pytest.raises(bufbroker.BrokerError) as e:
            att.map(Direction.FROM_DEVICE)
        assert e.value.errno == errno.EBUSY
        with pytest.raises(bufbroker.BrokerError) as e:
            att.detach()  # still mapped
        assert e.value.errno == errno.EBUSY
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.close()  # still attached
        assert e.value.errno == errno.EBUSY
        m1.unmap()
        m2.unmap()
        att.detach()
        with pytest.raises(bufbroker.BrokerError) as e:
            att.map(Direction.TO_DEVICE)  # map after detach
        assert e.value.errno == errno.EINVAL

        both = buf.attach()
        bi = both.map(Direction.BIDIRECTIONAL)
        for direction in Direction:  # BIDIRECTIONAL covers every direction
            both.map(direction).unmap()
        bi.memory[:3] = b"abc"
        bi.unmap()
        both.detach()
        with pytest.raises(bufbroker.BrokerError) as e:
            both.map(Direction.TO_DEVICE)
        assert e.value.errno == errno.EINVAL


def test_mapping_memory_is_shared_between_devices(broker: Broker) -> None:
    with broker.connect("writer") as w, broker.connect("reader") as r:
        buf = w.allocate(8192)
        handle = buf.share()
        theirs = r.import_handle(handle)
        os.close(handle)
        with buf.attach() as wa, wa.map(Direction.FROM_DEVICE) as wm:
            wm.memory[4096:4100] = b"ping"
            with theirs.attach() as ra, ra.map(Direction.TO_DEVICE) as rm:
                assert bytes(rm.memory[4096:4100]) == b"ping"
                assert rm.segments == wm.segments


def test_unmap_with_a_live_view_is_a_clear_error(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        att = buf.attach()
        m = att.map(Direction.BIDIRECTIONAL)
        view = m.memory[10:20]
        with pytest.raises(bufbroker.BrokerError) as e:
            m.unmap()
        assert e.value.errno == errno.EBUSY
        view[0] = 7  # still mapped: the memory is intact and usable
        assert dev.buffers()[0]["attachments"][0]["map_count"] == 1
        view.release()
        m.unmap()
        assert dev.buffers()[0]["attachments"][0]["map_count"] == 0


def test_cpu_access_rules(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        with buf.cpu_access(Access.RW) as mem:
            mem[0] = 1
            assert dev.buffers()[0]["cpu_access"][0]["access"] == "rw"
        assert dev.buffers()[0]["cpu_access"] == []
        with pytest.raises(bufbroker.BrokerError) as e:
            dev._call(bufbroker.protocol.CpuEnd(buffer=buf.id, access=Access.READ))
        assert e.value.errno == errno.EINVAL  # end without a matching begin
        with buf.cpu_access(Access.READ) as mem:
            assert mem.readonly and mem[0] == 1


def test_buffer_ids_not_held_are_ebadf(broker: Broker) -> None:
    with broker.connect("a") as a, broker.connect("b") as b:
        buf = a.allocate(4096)
        with pytest.raises(bufbroker.BrokerError) as e:
            b._call(bufbroker.protocol.Attach(buffer=buf.id))
        assert e.value.errno == errno.EBADF
