"""Late allocation: the layout is chosen at the first map, for every device attached then."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Access, Constraints, Direction, Segment

from conftest import Broker, RawClient

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


@pytest.mark.parametrize(
    "constraints",
    [
        {"alignment": 3 * PAGE},  # not a power of two
        {"alignment": PAGE // 2},  # less than a page
        {"max_segment_size": PAGE + 1},  # not a page multiple
        {"max_segment_size": 0},
        {"max_segments": 0},
        {"max_segments": -1},
        {"max_segments": "one"},
        {"max_segments": None},
        {"contiguous": True},  # unknown key
        [1, 2],  # not a map
    ],
)
def test_constraints_are_validated_at_hello(
    broker: Broker, raw: Callable[[Broker], RawClient], constraints: object
) -> None:
    with broker.connect("bystander", constraints=Constraints(max_segments=2)) as bystander:
        c = raw(broker)
        c.request(7, "hello", {"version": 1, "name": "bad", "constraints": constraints})
        reply = c.recv()
        assert reply[:2] == [2, 7] and reply[2]["errno"] == errno.EINVAL, reply
        assert reply[2]["code"] == "EINVAL" and "constraints" in reply[2]["message"]
        assert c.recv() is None  # no device: the connection ends with the handshake
        assert [(d["name"], d["constraints"]) for d in bystander.devices()] == [
            ("bystander", {"max_segments": 2})
        ]
        bystander.allocate(2 * PAGE).attach()  # the broker serves the others as before
        good = raw(broker)
        good.request(1, "hello", {"version": 1, "name": "good", "constraints": {"alignment": 2 * PAGE}})
        assert good.recv()[:2] == [1, 1]
        assert {d["name"]: d["constraints"] for d in bystander.devices()}["good"] == {"alignment": 2 * PAGE}


def test_the_client_refuses_bad_constraints_before_sending_them() -> None:
    with pytest.raises(bufbroker.BrokerError) as e:
        Constraints(alignment=3 * PAGE)
    assert e.value.errno == errno.EINVAL
