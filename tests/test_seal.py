"""Seal, proved by the kernel: tools/testing/selftests/memfd/memfd_test.c, through the broker.

Each selftest's writers are tried on a sealed buffer, on the memfd and the hugetlb heap: the
mapping the writer kept, a new writable mapping, cpu access, write(2), a descriptor reopened
read-write through /proc/self/fd, mprotect of a read-only mapping, and ftruncate.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import time
from collections.abc import Callable, Iterator

import pytest

import bufbroker
from bufbroker import Access, Direction
from bufbroker import protocol as p

from conftest import Broker, Peer
from peer import pattern

F_SEAL_FUTURE_WRITE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.fixture(params=["memfd", "hugetlb"])
def heap(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "hugetlb":
        request.getfixturevalue("huge_pages")(8)
    yield request.param


def _code(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno or 0


def backing_fd(buf: bufbroker.Buffer, access: Access = Access.READ) -> int:
    """A descriptor of the buffer's backing as a cpu access hands it over (the caller's to close)."""
    device = buf._device
    _, fds = device._call(p.CpuBegin(buffer=buf.id, access=access))
    device._call(p.CpuEnd(buffer=buf.id, access=access))
    return fds[0]


def reopen(fd: int, flags: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", flags)


def _seals(buf: bufbroker.Buffer) -> int:
    fd = backing_fd(buf)
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    finally:
        os.close(fd)


def _listed(dev: bufbroker.Device, buf: bufbroker.Buffer) -> dict[str, object]:
    [entry] = [b for b in dev.buffers() if b["id"] == buf.id]
    return entry


def _assert_no_new_writer(buf: bufbroker.Buffer, span: int) -> None:
    """mfd_fail_write: every way to write anew fails, for the broker and for the kernel."""
    with buf.attach() as att:
        for direction in (Direction.FROM_DEVICE, Direction.BIDIRECTIONAL):
            assert _code(att.map, direction) == errno.EPERM
    for access in (Access.WRITE, Access.RW):
        assert _code(buf.cpu_access(access).begin) == errno.EPERM
    ro = backing_fd(buf)
    rw = reopen(ro, os.O_RDWR)  # the selftest's mfd_assert_reopen_fd: the open itself works
    try:
        # hugetlbfs has no write(2) at all (EINVAL); a memfd refuses it once sealed (EPERM)
        assert _code(os.pwrite, rw, b"x", 0) == (errno.EINVAL if span >= 2 << 20 else errno.EPERM)
        assert _code(lambda: mmap.mmap(rw, span)) == errno.EPERM
    finally:
        os.close(rw)
        os.close(ro)


def test_seal_future_write_keeps_old_mappings_and_refuses_new_writers(broker: Broker, heap: str) -> None:
    """SEAL-FUTURE-WRITE, with the /proc/self/fd reopen."""
    with broker.connect("writer") as dev:
        buf = dev.allocate(1 << 20, name="frame", heap=heap, sealable=True)
        att = buf.attach()
        m = att.map(Direction.BIDIRECTIONAL)
        m.memory[:5] = b"hello"
        buf.seal()
        assert (buf.sealed, buf.immutable) == (True, False)  # the writer's mapping still exists
        assert _seals(buf) & (F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_WRITE) == F_SEAL_FUTURE_WRITE
        m.memory[5:8] = b"!!!"  # the mapping made before the seal keeps working, as the kernel says
        _assert_no_new_writer(buf, 2 << 20 if heap == "hugetlb" else 1 << 20)
        with buf.cpu_access(Access.READ) as mem:
            assert bytes(mem[:8]) == b"hello!!!"
        entry = _listed(dev, buf)
        assert (entry["sealable"], entry["sealed"], entry["immutable"]) == (True, True, False)
        m.unmap()
        att.detach()


def test_seal_write_comes_once_the_last_writable_mapping_goes(broker: Broker, heap: str) -> None:
    """SEAL-WRITE: immutable as soon as no writable mapping remains, proved by F_GET_SEALS."""
    with broker.connect("writer") as dev, broker.connect("reader") as other:
        buf = dev.allocate(3 * 4096 + 5, name="frame", heap=heap, sealable=True)
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:] = b"\x07" * len(mem)
            buf.seal()
            assert _seals(buf) & fcntl.F_SEAL_WRITE == 0
        broker.wait_for(lambda: bool(_listed(dev, buf)["immutable"]))
        assert _seals(buf) & fcntl.F_SEAL_WRITE
        mine = other.open("frame", sealed=True)
        assert (mine.size, mine.sealed, mine.immutable) == (3 * 4096 + 5, True, True)
        with mine.cpu_access(Access.READ) as mem:
            assert bytes(mem) == b"\x07" * (3 * 4096 + 5)
        _assert_no_new_writer(mine, 2 << 20 if heap == "hugetlb" else 4 * 4096)


def test_seal_write_map_read_cannot_be_made_writable(broker: Broker, heap: str) -> None:
    """SEAL-WRITE-MAP-READ: a shared read-only mapping made after the seal cannot mprotect to write."""
    span = 2 << 20 if heap == "hugetlb" else 4096
    with broker.connect() as dev:
        buf = dev.allocate(100, heap=heap, sealable=True)
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as reading:
            buf.seal()  # a read-only mapping is no writer: immutable at once
            broker.wait_for(lambda: bool(_listed(dev, buf)["immutable"]))
            assert bytes(reading.memory) == bytes(100)
        ro = backing_fd(buf)
        rw = reopen(ro, os.O_RDWR)
        try:
            addr = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, rw, 0)
            assert addr not in (None, ctypes.c_void_p(-1).value)
            assert _libc.mprotect(addr, span, mmap.PROT_READ | mmap.PROT_WRITE) == -1
            assert ctypes.get_errno() == errno.EACCES
            _libc.munmap(addr, span)
        finally:
            os.close(rw)
            os.close(ro)


def test_seal_shrink_and_grow_hold_for_every_descriptor(broker: Broker, heap: str) -> None:
    """SEAL-SHRINK / SEAL-GROW: set before any client sees the backing, sealed or not."""
    span = 2 << 20 if heap == "hugetlb" else 2 * 4096
    with broker.connect() as dev:
        for sealable in (False, True):
            buf = dev.allocate(span - 1, heap=heap, sealable=sealable)
            fd = backing_fd(buf, Access.RW)
            try:
                assert os.fstat(fd).st_size == span
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                both = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                assert seals & both == both
                assert bool(seals & fcntl.F_SEAL_SEAL) is not sealable  # only sealable ones take more
                assert _code(os.ftruncate, fd, 0) == errno.EPERM
                assert _code(os.ftruncate, fd, span * 2) == errno.EPERM
            finally:
                os.close(fd)
            buf.close()


def test_a_kept_writable_mapping_delays_immutable_until_it_goes(broker: Broker) -> None:
    """The kernel refuses F_SEAL_WRITE (EBUSY) while a mapping the broker was not told of lives."""
    with broker.connect() as dev:
        buf = dev.allocate(4096, sealable=True)
        fd = backing_fd(buf, Access.RW)
        hidden = mmap.mmap(fd, 4096)  # a writable mapping the broker knows nothing of
        os.close(fd)
        buf.seal()
        hidden[:3] = b"old"
        for _ in range(20):
            dev.ping()
        assert _listed(dev, buf)["immutable"] is False
        hidden.close()
        broker.wait_for(lambda: bool(_listed(dev, buf)["immutable"]))
        with buf.cpu_access(Access.READ) as mem:
            assert bytes(mem[:3]) == b"old"


def test_seal_needs_sealable_and_write_access(broker: Broker) -> None:
    with broker.connect() as dev, broker.connect("other") as other:
        plain = dev.allocate(4096)
        assert _code(plain.seal) == errno.EINVAL
        buf = dev.allocate(4096, sealable=True)
        fd = buf.share(readonly=True)
        readonly = other.import_handle(fd)
        os.close(fd)
        assert _code(readonly.seal) == errno.EACCES
        buf.seal()
        buf.seal()  # sealed already: nothing to do, as adding a seal twice is for the kernel
        assert buf.sealed
        assert _code(lambda: dev.allocate(4096, heap="shm", sealable=True)) in (errno.EINVAL, errno.ENODEV)


def test_a_getter_waits_for_the_buffer_to_be_sealed(broker: Broker, peer: Callable[..., Peer]) -> None:
    """Plasma's create / seal / get: the getter's open answers once the seal's reply is sent."""
    getter = peer("get_sealed", broker.socket, "result", 30)
    assert json.loads(getter.line()) == {"waiting": True}
    with broker.connect("maker") as dev:
        buf = dev.allocate(10_000, name="result", sealable=True)
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:] = pattern(10_000)
        broker.wait_for(lambda: any(d["name"] == "getter" for d in dev.devices()))
        time.sleep(0.1)  # the name exists and the getter still waits: not sealed yet
        assert getter.proc.poll() is None
        buf.seal()
        seen = json.loads(getter.line())
        assert seen == {"sealed": True, "size": 10_000, "sha": hashlib.sha256(pattern(10_000)).hexdigest()}
        getter.finish()


def test_an_unsealed_buffer_is_eagain_and_a_missing_one_enoent(broker: Broker) -> None:
    with broker.connect("maker") as dev:
        dev.allocate(4096, name="draft", sealable=True)
        assert _code(lambda: dev.open("draft", sealed=True)) == errno.EAGAIN
        assert _code(lambda: dev.open("draft", sealed=True, timeout=0.2)) == errno.EAGAIN
        assert _code(lambda: dev.open("nothing", sealed=True, timeout=0.2)) == errno.ENOENT
        assert dev.open("draft").sealed is False  # without sealed=True, open does not wait


def test_a_buffer_sealed_before_any_map_is_zeros_for_ever(broker: Broker, heap: str) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(5000, heap=heap, sealable=True)
        buf.seal()
        broker.wait_for(lambda: bool(_listed(dev, buf)["immutable"]))
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            assert bytes(m.memory) == bytes(5000)
        _assert_no_new_writer(buf, 2 << 20 if heap == "hugetlb" else 8192)


def test_a_writer_killed_lets_the_buffer_become_immutable(broker: Broker, peer: Callable[..., Peer]) -> None:
    """Its mappings die with it: the broker's count of writable mappings reaches zero."""
    with broker.connect("sealer") as dev:
        buf = dev.allocate(4096, name="shared", sealable=True)
        writer = peer("write_mapped", broker.socket, "shared")
        assert json.loads(writer.line()) == {"mapped": True}
        buf.seal()
        for _ in range(10):
            dev.ping()
        assert _listed(dev, buf)["immutable"] is False  # the writer still maps it
        writer.stop()
        broker.wait_for(lambda: bool(_listed(dev, buf)["immutable"]))
        assert _seals(buf) & fcntl.F_SEAL_WRITE
        with buf.cpu_access(Access.READ) as mem:
            assert bytes(mem[:6]) == b"writer"
