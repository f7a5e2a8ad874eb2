"""Views of mapped memory: whatever holds one keeps unmapping refused with EBUSY, never a raw
BufferError and never memory unmapped under a live pointer; numpy, DLPack, pyarrow and PIL over
a mapping, and the backing's descriptors."""

from __future__ import annotations

import errno
import mmap
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import pyarrow
import pytest

import bufbroker
from bufbroker import Access, Direction

from conftest import Broker

HOLDERS: dict[str, Callable[[bufbroker.Mapping], Any]] = {
    "slice": lambda m: m.memory[10:20],
    "reference to the view": lambda m: [m.memory],  # as torch.frombuffer keeps it
    "PickleBuffer": lambda m: pickle.PickleBuffer(m.memory),
    "pyarrow.py_buffer": lambda m: pyarrow.py_buffer(m.memory),
    "PIL.Image.frombuffer": lambda m: PIL.Image.frombuffer("L", (64, 64), m.memory, "raw", "L", 0, 1),
    "numpy.frombuffer": lambda m: np.frombuffer(m.memory, np.uint8),
    "asarray": lambda m: m.asarray(np.uint32, (16, 16)),
    "asarray slice": lambda m: m.asarray()[5:9],
    "numpy.from_dlpack": lambda m: np.from_dlpack(m),
}


@pytest.mark.parametrize("hold", HOLDERS.values(), ids=HOLDERS.keys())
def test_whatever_holds_a_view_keeps_unmap_busy(
    broker: Broker, hold: Callable[[bufbroker.Mapping], Any]
) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        with buf.attach() as att:
            m = att.map(Direction.BIDIRECTIONAL)
            held = hold(m)
            for _ in range(2):  # refused, and refused again: nothing changed
                with pytest.raises(bufbroker.BrokerError) as e:
                    m.unmap()
                assert e.value.errno == errno.EBUSY
            m.memory[0] = 7  # still mapped and usable
            assert dev.buffers()[0]["attachments"][0]["map_count"] == 1
            del held
            m.unmap()
            assert m.unmapped and dev.buffers()[0]["attachments"][0]["map_count"] == 0


def test_closing_the_device_with_live_views_raises_nothing_and_disconnects(broker: Broker) -> None:
    dev = broker.connect()
    buf = dev.allocate(4096)
    m = buf.attach().map()
    m.memory[:4] = b"kept"
    held = pyarrow.py_buffer(m.memory)
    dev.close()
    assert dev.closed and dev.fileno() == -1
    assert bytes(held)[:4] == b"kept"  # the memory stays mapped while the view lives
    with broker.connect("other") as other:
        broker.wait_for(lambda: other.devices() and len(other.devices()) == 1)


def test_the_cpu_access_view_may_outlive_its_block_by_name_only(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:5] = b"hello"
        assert dev.buffers()[0]["cpu_access"] == []
        with pytest.raises(ValueError):
            mem[0]  # released: no access to memory that may be unmapped
        with pytest.raises(bufbroker.BrokerError) as e, buf.cpu_access(Access.READ) as mem:
            kept = [mem]  # a second holder, as torch.frombuffer(mem) would be
        assert e.value.errno == errno.EBUSY
        assert bytes(kept[0][:5]) == b"hello"  # not released under its holder
        del kept
        assert dev.buffers()[0]["cpu_access"] != []


def test_a_users_exception_is_not_lost_to_the_view_it_left(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        with pytest.raises(ValueError, match="mine") as e, buf.cpu_access(Access.RW) as mem:
            array = np.frombuffer(mem, np.uint8)
            raise ValueError("mine")
        assert "still in use" in e.value.__notes__[0]
        with pytest.raises(ZeroDivisionError), buf.attach() as att, att.map() as m:
            arr = m.asarray()
            1 / 0  # noqa: B018
        del array, arr
        assert isinstance(m, bufbroker.Mapping)
        m.unmap()
        att.detach()


def test_end_without_begin_is_einval(broker: Broker) -> None:
    with broker.connect() as dev:
        access = dev.allocate(4096).cpu_access(Access.READ)
        with pytest.raises(bufbroker.BrokerError) as e:
            access.end()
        assert e.value.errno == errno.EINVAL


def test_asarray_shapes_an_image_and_keeps_read_only_memory_read_only(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(1920 * 1080 * 3)
        with buf.attach() as att, att.map(Direction.FROM_DEVICE) as m:
            image = m.asarray(np.uint8, (1080, 1920, 3))
            image[1079, 1919] = (1, 2, 3)
            assert bytes(m.memory[1920 * 1080 * 3 - 3 : 1920 * 1080 * 3]) == b"\x01\x02\x03"
            words = m.asarray("<u4", 4, offset=8)
            assert words.shape == (4,)
            for shape, offset in (((1081, 1920, 3), 0), ((4,), len(m.memory))):
                with pytest.raises(bufbroker.BrokerError) as e:
                    m.asarray(np.uint8, shape, offset=offset)
                assert e.value.errno == errno.EINVAL
            del image, words
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            seen = m.asarray(np.uint8, (1080, 1920, 3))
            assert not seen.flags.writeable and tuple(seen[1079, 1919]) == (1, 2, 3)
            with pytest.raises(ValueError):
                seen[0, 0, 0] = 1
            last = bytes(np.from_dlpack(m)[1920 * 1080 * 3 - 3 : 1920 * 1080 * 3])
            assert last == b"\x01\x02\x03"
            del seen


def test_fds_are_new_descriptors_of_the_backing_with_the_mappings_access(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(8192)
        with buf.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
            (fd,) = m.fds()
            try:
                with mmap.mmap(fd, 8192) as mine:
                    mine[4096:4100] = b"mine"
                assert bytes(m.memory[4096:4100]) == b"mine"
            finally:
                os.close(fd)
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            (fd,) = m.fds()
            try:
                assert os.read(fd, 0) == b"" and os.pread(fd, 4, 4096) == b"mine"
                with pytest.raises(PermissionError):
                    mmap.mmap(fd, 8192)  # a writable shared mapping of a read-only descriptor
            finally:
                os.close(fd)
            m.unmap()
            with pytest.raises(bufbroker.BrokerError) as e:
                m.fds()
            assert e.value.errno == errno.EINVAL


def test_torch_over_a_mapping_keeps_it_mapped(broker: Broker) -> None:
    torch = pytest.importorskip("torch")  # optional: not among the test dependencies
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        with buf.attach() as att:
            m = att.map()
            for tensor in (torch.frombuffer(m.memory, dtype=torch.uint8), torch.from_numpy(m.asarray())):
                tensor[0] = 9
                with pytest.raises(bufbroker.BrokerError) as e:
                    m.unmap()
                assert e.value.errno == errno.EBUSY and int(tensor[0]) == 9
                del tensor
            m.unmap()
