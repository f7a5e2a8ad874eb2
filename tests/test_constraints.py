"""Late allocation: the layout is chosen at the first map, for every device attached then."""

from __future__ import annotations

import errno
import os

import pytest

import bufbroker
from bufbroker import Access, Constraints, Direction, Segment

from conftest import Broker

PAGE = 4096
SIZE = 64 * PAGE


def _layout(broker: Broker, *constraints: Constraints) -> list[Segment]:
    devices = [broker.connect(f"dev{i}", constraints=c) for i, c in enumerate(constraints)]
    try:
        buf = devices[0].allocate(SIZE)
        handle = buf.share()
        bufs = [buf] + [d.import_handle(handle) for d in devices[1:]]
        os.close(handle)
        atts = [b.attach() for b in bufs]
        [entry] = [e for e in devices[0].buffers() if e["id"] == buf.id]
        assert entry["layout"] is None  # nothing allocated before the map
        with atts[0].map(Direction.TO_DEVICE) as m:
            return m.segments
    finally:
        for d in devices:
            d.close()


def test_each_constraint_shapes_the_layout(broker: Broker) -> None:
    assert _layout(broker, Constraints()) == [Segment(0, SIZE)]
    segs = _layout(broker, Constraints(max_segment_size=16 * PAGE))
    assert segs == [Segment(i * 16 * PAGE, 16 * PAGE) for i in range(4)]
    # Alignment shortens segments to a multiple of it, so every offset stays aligned.
    segs = _layout(broker, Constraints(max_segment_size=24 * PAGE), Constraints(alignment=16 * PAGE))
    assert [s.length for s in segs] == [16 * PAGE] * 4
    assert all(s.offset % (16 * PAGE) == 0 for s in segs)
    # max_segments alone allows one contiguous segment, together with others the tightest wins.
    segs = _layout(broker, Constraints(max_segments=4), Constraints(max_segment_size=16 * PAGE))
    assert len(segs) == 4
    assert sum(s.length for s in segs) == SIZE


def test_conflicting_devices_get_einval_naming_the_device(broker: Broker) -> None:
    with (
        broker.connect("scanout", constraints=Constraints(max_segments=1)) as a,
        broker.connect("dma-engine", constraints=Constraints(max_segment_size=4 * PAGE)) as b,
    ):
        buf = a.allocate(SIZE)
        buf.attach()
        handle = buf.share()
        theirs = b.import_handle(handle)
        with pytest.raises(bufbroker.BrokerError) as e:
            theirs.attach()
        assert e.value.errno == errno.EINVAL
        assert "scanout" in str(e.value)
        assert b.buffers()[0]["attachments"] and len(b.buffers()[0]["attachments"]) == 1


def test_a_device_that_cannot_address_the_size_alone_gets_einval(broker: Broker) -> None:
    with broker.connect("tiny", constraints=Constraints(max_segments=2, max_segment_size=PAGE)) as d:
        buf = d.allocate(3 * PAGE)
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.attach()
        assert e.value.errno == errno.EINVAL and "tiny" in str(e.value)


def test_attach_after_allocation_that_the_layout_cannot_serve_is_ebusy(broker: Broker) -> None:
    with (
        broker.connect("cpu") as a,
        broker.connect("contig", constraints=Constraints(max_segments=1)) as b,
        broker.connect("small", constraints=Constraints(max_segment_size=8 * PAGE)) as c,
    ):
        buf = a.allocate(SIZE)
        with buf.cpu_access(Access.WRITE):  # first cpu access allocates: one segment
            pass
        handle = buf.share()
        b.import_handle(handle).attach().detach()  # one segment suits it
        with pytest.raises(bufbroker.BrokerError) as e:
            c.import_handle(handle).attach()
        assert e.value.errno == errno.EBUSY


def test_constraints_are_validated_at_hello(broker: Broker) -> None:
    with pytest.raises(bufbroker.BrokerError) as e:
        Constraints(alignment=3 * PAGE)
    assert e.value.errno == errno.EINVAL
