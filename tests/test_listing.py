"""Listings stay readable whatever one client does: pages fit a packet, entries are bounded."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Direction
from bufbroker.broker import Config, State
from bufbroker.broker._introspect import PAGE, REPLY_BYTES, buffer_page, device_page
from bufbroker.broker._records import Device
from bufbroker.protocol import Constraints, packed_size

from conftest import Broker


def _device(state: State, name: str) -> Device:
    return state.add_device(name=name, pid=1, uid=1000, gid=1000, command="test", constraints=Constraints())


def test_attachments_per_device_are_limited(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory("--max-attachments-per-device", "3")
    with b.connect("greedy") as dev, b.connect("other") as other:
        buf = dev.allocate(4096)
        kept = [buf.attach() for _ in range(3)]
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.attach()
        assert e.value.errno == errno.EDQUOT and "max_attachments_per_device" in str(e.value)
        assert buf.handle is not None
        theirs = other.import_handle(buf.handle)
        theirs.attach().detach()  # the limit is per device
        kept.pop().detach()
        buf.attach().detach()  # room again
        theirs.close()


def test_a_buffer_attached_thousands_of_times_still_lists(broker: Broker) -> None:
    """Two devices at their attachment limit make one buffer's entry bigger than a page."""
    with broker.connect("a") as a, broker.connect("b") as b, broker.connect("inspector") as inspector:
        buf = a.allocate(4096, name="crowded")
        assert buf.handle is not None
        theirs = b.import_handle(buf.handle)
        small = a.allocate(4096, name="after")
        for _ in range(1024):
            buf.attach()
            theirs.attach()
        listing = inspector.buffers()
        assert [x["name"] for x in listing] == ["crowded", "after"]
        crowded, after = listing
        assert crowded["truncated"] is True and 0 < len(crowded["attachments"]) < 2048
        assert "truncated" not in after
        assert packed_size(crowded) <= REPLY_BYTES
        small.close()


def test_pages_are_bounded_by_bytes_and_entries() -> None:
    state = State(Config(max_attachments_per_device=10_000))
    dev = _device(state, "dev")
    buffers = [state.allocate(dev, 4096, name=None, heap="memfd") for _ in range(2 * PAGE + 5)]
    for buf in buffers[:3]:
        for _ in range(1500):  # about 90 KiB of attachments each: one such entry per page
            state.attach(dev, buf.id)
    seen: list[int] = []
    after, pages = 0, 0
    while True:
        page, more = buffer_page(state, 0, after)
        pages += 1
        assert 0 < len(page) <= PAGE and packed_size(page) <= REPLY_BYTES + 16
        seen += [x["id"] for x in page]
        after = page[-1]["id"]
        if not more:
            break
    assert seen == [b.id for b in buffers]  # each once, in order, none lost at a page edge
    assert pages >= 5  # three big entries on pages of their own, then 128-entry pages
    devices, more = device_page(state, 0, 0)
    assert [d["name"] for d in devices] == ["dev"] and not more


def test_a_layout_too_long_for_one_reply(broker: Broker) -> None:
    """4 KiB segments of 64 MiB: the attach is refused with a reason, and nothing is fixed."""
    with (
        broker.connect("fine", constraints=Constraints(max_segment_size=4096)) as dev,
        broker.connect("inspector") as inspector,
    ):
        buf = dev.allocate(64 << 20)
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.attach()
        assert e.value.errno == errno.EMSGSIZE and "max_segment_size" in str(e.value)
        [entry] = inspector.buffers()
        assert entry["layout"] is None and entry["attachments"] == []
        small = dev.allocate(8 << 20)  # 2,048 segments fit
        with small.attach() as att, att.map(Direction.TO_DEVICE) as m:
            assert len(m.segments) == 2048
        [_, entry] = inspector.buffers()
        assert len(entry["layout"]) == 2048 and "truncated" not in entry
        buf.close()
        small.close()
