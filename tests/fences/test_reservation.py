"""Ports of IGT's dmabuf_sync_file: each buffer's reservation, through sync_file import/export.

IGT's busy work is a GPU spinner writing or reading the buffer; here it is a timeline point
that a device promised (a fence for it) and signals when its work is done.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Access

from conftest import Broker, Peer
from fence_fixtures import channel, fence_peer

__all__ = ["channel", "fence_peer"]

READ, WRITE, RW = Access.READ, Access.WRITE, Access.RW


def _busy(buf: bufbroker.Buffer, access: Access) -> bool:
    """Whether ``access`` would have to wait now (IGT's sync_file_busy on an exported fence)."""
    fence = buf.export_fence(access)
    try:
        return fence.status == 0
    finally:
        fence.close()


def test_export_basic(broker: Broker) -> None:
    """export-basic: a writer blocks readers and writers; a reader blocks only writers."""
    with broker.connect("gpu") as dev, broker.connect("other") as other:
        buf = dev.allocate(4096)
        handle = buf.share()
        seen = other.import_handle(handle)
        os.close(handle)
        assert not _busy(seen, READ) and not _busy(seen, WRITE)
        tl = dev.timeline()
        with tl.fence(1) as fence:
            buf.attach_fence(fence, WRITE)
        assert _busy(seen, READ) and _busy(seen, WRITE) and _busy(seen, RW)
        tl.signal(1)
        assert not _busy(seen, READ) and not _busy(seen, WRITE)
        with tl.fence(2) as fence:
            buf.attach_fence(fence, READ)
        assert not _busy(seen, READ) and _busy(seen, WRITE)
        tl.signal(2)
        assert not _busy(seen, WRITE)


def test_export_before_signal(broker: Broker) -> None:
    """export-before-signal: a fence exported while busy signals when the work does."""
    with broker.connect() as dev:
        buf, tl = dev.allocate(4096), dev.timeline()
        with tl.fence(1) as fence:
            buf.attach_fence(fence, WRITE)
        read, write = buf.export_fence(READ), buf.export_fence(WRITE)
        assert read.status == 0 and write.status == 0
        tl.signal(1)
        read.wait(timeout=5)
        write.wait(timeout=5)


def test_export_multiwait(broker: Broker) -> None:
    """export-multiwait: a WRITE export waits for every reader, on two timelines."""
    with broker.connect() as dev:
        buf, first, second = dev.allocate(4096), dev.timeline(), dev.timeline()
        for tl in (first, second):
            with tl.fence(1) as fence:
                buf.attach_fence(fence, READ)
        exported = buf.export_fence(WRITE)
        assert len(exported.info()) == 2 and not _busy(buf, READ)
        first.signal(1)
        assert exported.status == 0
        second.signal(1)
        exported.wait(timeout=0)


def test_export_wait_after_attach(broker: Broker) -> None:
    """export-wait-after-attach: an export is a snapshot; later fences do not join it."""
    with broker.connect() as dev:
        buf, tl = dev.allocate(4096), dev.timeline()
        before = buf.export_fence(WRITE)
        with tl.fence(1) as fence:
            buf.attach_fence(fence, WRITE)
        assert before.status == 1
        before.wait(timeout=0)
        after = buf.export_fence(READ)
        assert after.status == 0
        tl.signal(1)
        assert after.status == 1


def test_import_basic(broker: Broker) -> None:
    """import-basic: a sync_file imported as a write fence blocks readers until it signals."""
    with broker.connect("gpu") as dev, broker.connect("cpu") as other:
        buf, tl = dev.allocate(4096), dev.timeline()
        made = tl.fence(1)
        fd = made.share()
        fence = other.import_fence(fd)
        os.close(fd)
        handle = buf.share()
        seen = other.import_handle(handle)
        os.close(handle)
        seen.attach_fence(fence, WRITE)
        assert _busy(buf, READ) and _busy(buf, WRITE)
        tl.signal(1)
        assert not _busy(buf, READ) and not _busy(buf, WRITE)
        made2 = tl.fence(2)
        seen.attach_fence(other.import_fence(made2.fileno()), READ)
        assert not _busy(buf, READ) and _busy(buf, WRITE)


def test_import_multiple_read_only(broker: Broker) -> None:
    """import-multiple-read-only: two readers; writers wait for both, readers for none."""
    with broker.connect() as dev:
        buf, first, second = dev.allocate(4096), dev.timeline(), dev.timeline()
        buf.attach_fence(first.fence(1), READ)
        buf.attach_fence(second.fence(1), READ)
        assert not _busy(buf, READ) and _busy(buf, WRITE)
        first.signal(1)
        assert not _busy(buf, READ) and _busy(buf, WRITE)
        second.signal(1)
        assert not _busy(buf, WRITE)


def test_import_multiple_read_write(broker: Broker) -> None:
    """import-multiple-read-write: a reader then a writer; readers wait for the writer only."""
    with broker.connect() as dev:
        buf, reading, writing = dev.allocate(4096), dev.timeline(), dev.timeline()
        buf.attach_fence(reading.fence(1), READ)
        buf.attach_fence(writing.fence(1), WRITE)
        exported = buf.export_fence(READ)
        assert [p["timeline"] for p in exported.info()] == [writing.id]
        assert len(buf.export_fence(WRITE).info()) == 2
        writing.signal(1)
        assert not _busy(buf, READ) and _busy(buf, WRITE)
        reading.signal(1)
        assert not _busy(buf, WRITE)


def test_a_write_fence_of_the_same_timeline_replaces_earlier_points(broker: Broker) -> None:
    """dma_resv_add_fence: a later point of a timeline replaces its earlier ones (not unbounded)."""
    with broker.connect() as dev:
        buf, tl = dev.allocate(4096), dev.timeline()
        for point in range(1, 200):
            with tl.fence(point) as fence:
                buf.attach_fence(fence, WRITE if point % 2 else READ)
        points = [(f["point"], f["usage"]) for f in dev.buffers()[0]["fences"]]
        assert points == [(199, "write")]  # a write replaces the reads before it, too


def test_a_reader_sees_exactly_what_the_writer_wrote(
    broker: Broker,
    fence_peer: Callable[..., Peer],
    channel,  # type: ignore[no-untyped-def]
) -> None:
    """The writer attaches a write fence, then writes; the reader's cpu access READ waits for it."""
    size = 1 << 20
    a, b = channel()
    writer = fence_peer("writer", broker.socket, b.fileno(), size, pass_fds=(b.fileno(),))
    assert writer.line()
    c, d = channel()
    reader = fence_peer("reader", broker.socket, d.fileno(), size, pass_fds=(d.fileno(),))
    handle = bufbroker.recv_handle(a)
    bufbroker.send_handle(c, handle)
    os.close(handle)
    assert reader.line()  # imported; now parked in cpu_begin until the write fence signals
    writer.send("go")
    assert '"signalled"' in writer.line()
    assert json.loads(reader.line())["sevens"] == size
    writer.send("done")
    assert reader.finish() == 0 and writer.finish() == 0


def test_an_exporters_buffer_waits_for_its_fences_before_the_exporter_is_asked(
    broker: Broker,
    exporter: Callable[..., Peer],
) -> None:
    """DMA_BUF_IOCTL_SYNC waits on the reservation, then calls the exporter's begin_cpu_access."""
    peer = exporter(broker, "exported")
    with broker.connect("writer") as dev, broker.connect("reader") as other:
        buf = dev.open("exported")
        tl = dev.timeline()
        with tl.fence(1) as fence:
            buf.attach_fence(fence, WRITE)
        handle = buf.share()
        seen = other.import_handle(handle)
        os.close(handle)
        with pytest.raises(bufbroker.BrokerError) as e:
            seen.cpu_access(READ, timeout=0.1).begin()
        assert e.value.errno == errno.ETIME  # the exporter was never asked
        tl.signal(1)
        with seen.cpu_access(READ, timeout=5) as mem:
            assert bytes(mem[:6]) == b"pool A"
    # One begin (the access that waited), then its end: the one that timed out never got there.
    assert [json.loads(peer.line())["call"] for _ in range(2)] == ["begin_cpu_access", "end_cpu_access"]
