"""Read-only handles, and the kernel's own refusal to write what they map (seals, modes)."""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Callable

import pytest

import bufbroker
from bufbroker import Access, Direction

from conftest import Broker, Peer


def _readonly_import(broker: Broker, dev: bufbroker.Device) -> tuple[bufbroker.Buffer, bufbroker.Buffer]:
    buf = dev.allocate(4096)
    with buf.cpu_access(Access.WRITE) as mem:
        mem[:4] = b"data"
    handle = buf.share(readonly=True)
    other = broker.connect("reader")
    ro = other.import_handle(handle)
    os.close(handle)
    return buf, ro


def test_write_directions_through_a_readonly_handle_are_eacces(broker: Broker) -> None:
    with broker.connect("owner") as dev:
        _, ro = _readonly_import(broker, dev)
        assert ro.readonly
        att = ro.attach()
        for direction in (Direction.FROM_DEVICE, Direction.BIDIRECTIONAL):
            with pytest.raises(bufbroker.BrokerError) as e:
                att.map(direction)
            assert e.value.errno == errno.EACCES
        for access in (Access.WRITE, Access.RW):
            with pytest.raises(bufbroker.BrokerError) as e:
                ro.cpu_access(access).begin()
            assert e.value.errno == errno.EACCES
        with pytest.raises(bufbroker.BrokerError) as e:
            ro.share()  # no upgrade by re-sharing
        assert e.value.errno == errno.EACCES
        with att.map(Direction.TO_DEVICE) as m:
            assert bytes(m.memory[:4]) == b"data"
        with ro.cpu_access(Access.READ) as mem:
            assert bytes(mem[:4]) == b"data"
        ro._device.close()


def _backing_fd(dev: bufbroker.Device, buf: bufbroker.Buffer, direction: Direction) -> int:
    """The raw backing descriptor the broker hands for a map (what a malicious peer sees)."""
    att = buf.attach()
    _, fds = dev._call(bufbroker.protocol.Map(attachment=att.id, direction=direction))
    return fds[0]


def test_the_kernel_refuses_a_writable_mmap_of_readonly_backing(
    broker: Broker, peer: Callable[..., Peer], other_uid: int
) -> None:
    with broker.connect("owner") as dev:
        _, ro = _readonly_import(broker, dev)
        fd = _backing_fd(ro._device, ro, Direction.TO_DEVICE)
        try:
            assert os.fstat(fd).st_mode & 0o777 == 0o400
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(OSError):
                os.write(fd, b"x")
            # Same uid can reopen (documented: no boundary within a uid)...
            # ...but a process of another uid cannot upgrade it through /proc/self/fd.
            stranger = peer("reopen_as", fd, other_uid, pass_fds=(fd,))
            assert json.loads(stranger.line()) == {"reopened": False, "errno": errno.EACCES}
            stranger.finish()
        finally:
            os.close(fd)
        ro._device.close()


def test_nobody_can_resize_backing_under_a_mapping(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(8192)
        fd = _backing_fd(dev, buf, Direction.BIDIRECTIONAL)
        try:
            for size in (0, 4096, 1 << 20):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            import fcntl

            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        finally:
            os.close(fd)
