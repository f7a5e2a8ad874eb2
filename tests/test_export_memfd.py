"""export_memfd: a client's own memfd as a buffer, under udmabuf's rules."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

import bufbroker
from bufbroker import Direction

from conftest import Broker, RawClient, start_broker

F_SEAL_FUTURE_WRITE = 0x10


def _memfd(size: int = 8192, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("mine", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_sealed_memfd_is_aliased_not_copied(broker: Broker) -> None:
    fd = _memfd()
    mine = mmap.mmap(fd, 8192)
    with broker.connect("exporter") as dev, broker.connect("importer") as other:
        buf = dev.export_memfd(fd, name="mine")
        assert buf.size == 8192
        handle = buf.share()
        theirs = other.import_handle(handle)
        os.close(handle)
        with theirs.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
            mine[100:105] = b"alias"  # written through the exporter's own mapping...
            assert bytes(m.memory[100:105]) == b"alias"  # ...seen through the broker's
            m.memory[0:2] = b"ok"
            assert mine[0:2] == b"ok"
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_GROW  # the client adds GROW, which the broker requires
    mine.close()
    os.close(fd)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: os.open("/dev/null", os.O_RDWR), errno.EBADFD),  # not a memfd
        (lambda: socket.socket().detach(), errno.EBADFD),
        (lambda: _memfd(seals=0), errno.EINVAL),  # no F_SEAL_SHRINK
        (lambda: _memfd(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE), errno.EINVAL),
        (lambda: _memfd(seals=fcntl.F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE), errno.EINVAL),
        (lambda: _memfd(size=4096 + 1), errno.EINVAL),  # not a page multiple
        (lambda: _memfd(size=0), errno.EINVAL),
    ],
)
def test_udmabuf_rules(broker: Broker, make: Callable[[], int], expected: int) -> None:
    fd = make()
    try:
        with broker.connect() as dev:
            with pytest.raises(bufbroker.BrokerError) as e:
                dev.export_memfd(fd)
            assert e.value.errno == expected
            assert dev.buffers() == []
            dev.ping()
    finally:
        os.close(fd)


def test_a_memfd_without_allow_sealing_is_rejected(broker: Broker) -> None:
    fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)  # F_SEAL_SEAL set: cannot add SHRINK
    os.ftruncate(fd, 4096)
    try:
        with broker.connect() as dev, pytest.raises(bufbroker.BrokerError) as e:
            dev.export_memfd(fd)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_a_broker_that_is_not_root_refuses_a_memfd_others_may_write(
    other_uid: int, raw: Callable[[Broker], RawClient]
) -> None:
    """It cannot make the memfd 0400, so a read-only importer could reopen it for writing."""
    directory = Path(tempfile.mkdtemp(prefix="bufbroker-test-"))
    directory.chmod(0o777)
    b = start_broker(directory, user=other_uid)
    fd = _memfd(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # as the client would send it
    try:
        os.fchmod(fd, 0o666)
        c = raw(b)
        c.hello()
        c.request(1, "export_memfd", {}, (fd,))
        reply = c.recv()
        assert reply[:2] == [2, 1] and reply[2]["errno"] == errno.EACCES
        with b.connect("exporter") as dev:  # the client takes the write bits off for us
            buf = dev.export_memfd(fd)
            assert os.fstat(fd).st_mode & 0o777 == 0o644
            with buf.attach() as att, att.map(Direction.BIDIRECTIONAL) as m:
                m.memory[:2] = b"ok"
            buf.close()
    finally:
        os.close(fd)
        b.stop()
        shutil.rmtree(directory, ignore_errors=True)
