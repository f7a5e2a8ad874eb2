"""Errors through the trio client: the broker's errno, the same as the blocking client's."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import trio
import trio.testing

import bufbroker
from bufbroker import Access, Direction
from bufbroker.client.trio import Device, recv_handle, send_handle

from conftest import Broker


async def raises(number: int | None, call: Callable[[], object]) -> bufbroker.BrokerError:
    with pytest.raises(bufbroker.BrokerError) as e:
        result = call()
        if hasattr(result, "__await__"):
            await result
    assert e.value.errno == number, e.value
    return e.value


async def test_rules_carry_their_errno(broker: Broker) -> None:
    async with bufbroker.open_device("wrong", socket=broker.socket) as dev:
        await raises(errno.EINVAL, lambda: dev.allocate(0))
        await raises(errno.ENOENT, lambda: dev.open("no-such-buffer"))
        buf = await dev.allocate(4096)
        await raises(errno.EINVAL, lambda: buf.set_name("x" * 32))
        await buf.set_name("é" * 15)  # 30 bytes of UTF-8
        assert buf.name == "é" * 15
        att = await buf.attach()
        m = await att.map(Direction.TO_DEVICE)
        await raises(errno.EBUSY, lambda: att.map(Direction.FROM_DEVICE))
        await raises(errno.EBUSY, lambda: att.detach())  # still mapped
        await m.unmap()
        await raises(errno.EBUSY, lambda: buf.close())  # still attached
        assert not buf.closed
        await att.detach()
        await raises(errno.EINVAL, lambda: att.map(Direction.TO_DEVICE))  # detached
        await buf.close()
        await dev.ping()  # errors leave the connection usable


async def test_same_errno_as_the_blocking_client(broker: Broker) -> None:
    def blocking() -> int | None:
        with broker.connect("sync") as dev, pytest.raises(bufbroker.BrokerError) as e:
            dev.allocate(0)
        return e.value.errno

    async with bufbroker.open_device("trio", socket=broker.socket) as dev:
        error = await raises(await trio.to_thread.run_sync(blocking), lambda: dev.allocate(0))
        assert error.code == "EINVAL"


async def test_handles_and_read_only_handles(broker: Broker) -> None:
    async with (
        bufbroker.open_device("owner", socket=broker.socket) as dev,
        bufbroker.open_device("reader", socket=broker.socket) as reader,
    ):
        buf = await dev.allocate(4096)
        readonly = await buf.share(readonly=True)
        theirs = await reader.import_handle(readonly)
        os.close(readonly)
        assert theirs.readonly and theirs.id == buf.id
        async with theirs.attach() as att:
            await raises(errno.EACCES, lambda: att.map(Direction.FROM_DEVICE))
            async with att.map(Direction.TO_DEVICE) as m:
                assert m.memory.readonly
        await raises(errno.EACCES, lambda: theirs.cpu_access(Access.WRITE).begin())
        await theirs.close()
        r, w = os.pipe()
        try:
            await raises(errno.EINVAL, lambda: reader.import_handle(r))  # not a handle
        finally:
            os.close(r)
            os.close(w)
        await buf.close()


async def test_missing_broker_names_the_socket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "none.sock")
    with pytest.raises(bufbroker.BrokerUnavailable) as e:
        async with bufbroker.open_device("x", socket=path):
            raise AssertionError("not reached")
    assert path in str(e.value)
    assert e.value.errno == errno.ENOENT


async def test_what_the_block_raises_comes_out_as_itself(broker: Broker) -> None:
    with pytest.raises(KeyError):  # not wrapped in an ExceptionGroup by the reader's nursery
        async with bufbroker.open_device("raiser", socket=broker.socket):
            raise KeyError("mine")
    with pytest.raises(bufbroker.BrokerError) as e:
        async with bufbroker.open_device("raiser", socket=broker.socket) as dev:
            await dev.allocate(0)
    assert e.value.errno == errno.EINVAL


async def test_a_refused_hello_raises_the_brokers_reason(broker_factory: Callable[..., Broker]) -> None:
    limited = broker_factory("--max-connections-per-uid", "1")
    async with bufbroker.open_device("first", socket=limited.socket) as first:
        with pytest.raises(bufbroker.BrokerError) as e:
            async with bufbroker.open_device("second", socket=limited.socket):
                raise AssertionError("not reached")
        assert e.value.errno == errno.ECONNREFUSED
        assert "max_connections_per_uid" in str(e.value)
        await first.ping()


async def waiters_after(dev: Device, event: Callable[[], object]) -> list[int | None]:
    """The errno each of three tasks waiting for a reply gets once ``event`` has happened."""
    errors: list[int | None] = []

    async def wait_forever() -> None:
        with pytest.raises(bufbroker.BrokerError) as e:
            await dev.open("never", timeout=60)
        errors.append(e.value.errno)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(wait_forever)
        await trio.testing.wait_all_tasks_blocked()
        result = event()
        if hasattr(result, "__await__"):
            await result
    return errors


async def test_aclose_wakes_every_waiting_task(broker: Broker) -> None:
    async with bufbroker.open_device("closing", socket=broker.socket) as dev:
        assert await waiters_after(dev, dev.aclose) == [errno.EBADF] * 3
        await raises(errno.EBADF, dev.ping)  # and every later request


async def test_a_broker_that_goes_away_fails_every_waiter(broker: Broker) -> None:
    async with bufbroker.open_device("orphan", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        assert await waiters_after(dev, broker.proc.kill) == [errno.ECONNRESET] * 3
        await raises(errno.ECONNRESET, dev.ping)  # and every later request
        await raises(errno.ECONNRESET, buf.close)
    # leaving the block closes the device quietly


async def test_closed_device(broker: Broker) -> None:
    async with bufbroker.open_device("closer", socket=broker.socket) as dev:
        buf = await dev.allocate(4096)
        handle = buf.handle
        assert handle is not None
        await dev.aclose()
        assert dev.closed and buf.handle is None  # its own handle is closed with the device
        with pytest.raises(OSError):
            os.fstat(handle)
        await raises(errno.EBADF, lambda: dev.allocate(4096))
        await buf.close()  # nothing left to release: a no-op
        await dev.aclose()


async def test_send_and_recv_handle_over_trio_sockets(broker: Broker) -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        async with bufbroker.open_device("passer", socket=broker.socket) as dev:
            buf = await dev.allocate(4096)
            handle = await buf.share()
            await send_handle(a, handle)
            os.close(handle)
            received = await recv_handle(b)
            theirs = await dev.import_handle(received)
            os.close(received)
            assert theirs.id == buf.id
        a.close()
        with pytest.raises(bufbroker.BrokerError) as e:
            await recv_handle(b)  # the peer hung up without a handle
        assert e.value.errno == errno.EBADF


async def test_blocking_helpers_interoperate_with_trio_ones(broker: Broker) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, trio.socket.from_stdlib_socket(b) as tb:
        r, w = os.pipe()
        bufbroker.send_handle(a, r)
        got = await recv_handle(tb)
        assert os.path.samestat(os.fstat(got), os.fstat(r))
        for fd in (r, w, got):
            os.close(fd)


def test_importing_bufbroker_does_not_import_trio() -> None:
    code = (
        "import sys, bufbroker, bufbroker.client\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
        "from bufbroker.client.trio import open_device\n"
        "assert bufbroker.open_device is open_device\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_device_type_is_public() -> None:
    assert bufbroker.client.trio.Device is Device
