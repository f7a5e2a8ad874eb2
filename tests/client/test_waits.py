"""Nothing waits for ever: a stopped or mute broker gives ETIMEDOUT naming the socket; an
interrupted wait leaves nothing held; one thread's long wait does not hold up the others; and
the caller's own mistakes are reported as such, the connection still working."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import trio

import bufbroker

from conftest import Broker


@pytest.fixture
def stopped(broker: Broker) -> Iterator[Broker]:
    """The broker, stopped with SIGSTOP for the test (and resumed after it)."""
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield broker
    finally:
        os.kill(broker.pid, signal.SIGCONT)


@pytest.fixture
def mute() -> Iterator[str]:
    """A SOCK_SEQPACKET socket that accepts connections and never says a word."""
    directory = tempfile.mkdtemp(prefix="bufbroker-mute-")
    path = os.path.join(directory, "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    try:
        yield path
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(directory)


def expect_timeout(error: pytest.ExceptionInfo[bufbroker.BrokerError], path: str) -> None:
    assert error.value.errno == errno.ETIMEDOUT, error.value
    assert path in str(error.value)


def test_connect_to_a_stopped_broker_times_out(stopped: Broker) -> None:
    start = time.monotonic()
    with pytest.raises(bufbroker.BrokerError) as e:
        bufbroker.connect("late", socket=stopped.socket, timeout=0.3)
    expect_timeout(e, stopped.socket)
    assert time.monotonic() - start < 5


def test_connect_to_a_mute_socket_times_out(mute: str) -> None:
    with pytest.raises(bufbroker.BrokerError) as e:
        bufbroker.connect("late", socket=mute, timeout=0.3)
    expect_timeout(e, mute)


def test_a_call_to_a_stopped_broker_times_out_and_the_device_recovers(broker: Broker) -> None:
    with broker.connect(timeout=0.3) as dev:
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(bufbroker.BrokerError) as e:
                dev.allocate(4096)
            expect_timeout(e, broker.socket)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        dev.ping()  # the late reply to allocate is read, and what it created is released
        broker.wait_for(lambda: dev.buffers() == [])  # the handle it carried is closed too


async def test_the_trio_client_times_out_too(broker: Broker, mute: str) -> None:
    with pytest.raises(bufbroker.BrokerError) as e:
        async with bufbroker.open_device("late", socket=mute, timeout=0.3):
            pass
    expect_timeout(e, mute)
    async with bufbroker.open_device("t", socket=broker.socket, timeout=0.3) as dev:
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(bufbroker.BrokerError) as e:
                await dev.allocate(4096)
            expect_timeout(e, broker.socket)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        with trio.fail_after(5):
            while await dev.buffers():
                await trio.sleep(0.01)


class Interrupted(Exception):
    pass


def test_an_interrupted_open_leaves_nothing_held(broker: Broker) -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with broker.connect("waiter") as dev, broker.connect("maker") as maker:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                dev.open("later", timeout=30)  # as Ctrl-C would
            made = maker.allocate(4096, name="later")  # the broker now completes the open
            broker.wait_for(lambda: len(maker.buffers()[0]["importers"]) == 2)
            dev.ping()  # reads the late reply and gives the buffer back
            dev.ping()
            assert [i["device"] for i in maker.buffers()[0]["importers"]] == [maker.id]
            assert dev.open("later").id == made.id  # and the device works on
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_waiting_open_does_not_hold_up_other_threads(broker: Broker) -> None:
    with broker.connect() as dev:
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(dev.open("later", timeout=10)))
        waiter.start()
        try:
            time.sleep(0.2)  # the open is waiting in the broker
            start = time.monotonic()
            for _ in range(20):
                dev.ping()
            buf = dev.allocate(4096, name="later")
            assert time.monotonic() - start < 5  # not the open's 10 s
        finally:
            waiter.join(15)
        assert len(got) == 1 and isinstance(got[0], bufbroker.Buffer) and got[0].id == buf.id


def test_an_open_that_timed_out_says_it_waited(broker: Broker) -> None:
    with broker.connect() as dev, pytest.raises(bufbroker.BrokerError) as e:
        dev.open("never", timeout=0.1)
    assert e.value.errno == errno.ENOENT and "0.1 s" in str(e.value)


def test_local_mistakes_are_the_callers_and_the_device_works_on(broker: Broker) -> None:
    with broker.connect() as dev:
        for call, number in (
            (lambda: dev.import_handle(-1), errno.EBADF),
            (lambda: dev.allocate(2**70), errno.EINVAL),
            (lambda: dev.allocate(4096, name="n" * 70_000), errno.EINVAL),
            (lambda: dev.allocate(4096, name="n" * 300_000), errno.EINVAL),
            (lambda: dev.open("n" * 32), errno.EINVAL),
        ):
            with pytest.raises(bufbroker.BrokerError) as e:
                call()
            assert e.value.errno == number, e.value
            assert "closed the connection" not in str(e.value)
            dev.ping()
    for size in (70_000, 300_000):
        with pytest.raises(bufbroker.BrokerError) as e:
            broker.connect("d" * size)
        assert e.value.errno == errno.EINVAL and "31 bytes" in str(e.value)


def test_socket_paths_and_what_is_not_a_broker(broker: Broker, tmp_path: pathlib.Path) -> None:
    with bufbroker.connect("path", socket=pathlib.Path(broker.socket)) as dev:
        dev.ping()
    with pytest.raises(bufbroker.BrokerError) as e:
        bufbroker.connect("dir", socket=tmp_path)
    assert "is a directory" in str(e.value) and str(tmp_path) in str(e.value)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "stream.sock"))
    stream.listen(1)
    try:
        with pytest.raises(bufbroker.BrokerError) as e:
            bufbroker.connect("stream", socket=tmp_path / "stream.sock")
        assert e.value.errno == errno.EPROTOTYPE and str(tmp_path / "stream.sock") in str(e.value)
    finally:
        stream.close()
    with pytest.raises(bufbroker.BrokerUnavailable) as e:
        bufbroker.connect("none", socket=tmp_path / "none.sock")
    assert "systemctl" not in str(e.value) and "BUFBROKER_SOCKET" not in str(e.value)
    for bad in (0, -1, float("nan")):
        with pytest.raises(bufbroker.BrokerError) as e:
            broker.connect(timeout=bad)
        assert e.value.errno == errno.EINVAL


async def test_trio_local_mistakes(broker: Broker) -> None:
    async with bufbroker.open_device("t", socket=broker.socket) as dev:
        with pytest.raises(bufbroker.BrokerError) as e:
            await dev.import_handle(-1)
        assert e.value.errno == errno.EBADF
        with pytest.raises(bufbroker.BrokerError) as e:
            await dev.allocate(2**70)
        assert e.value.errno == errno.EINVAL
        await dev.ping()
        with trio.fail_after(5):
            await dev.ping()


def test_threads_sharing_a_device_each_get_their_own_replies(broker: Broker) -> None:
    with broker.connect() as dev:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(40):
                    if i % 3:
                        dev.ping()
                    else:
                        buf = dev.allocate(4096 * (n + 1), name=f"t{n}-{i}")
                        assert buf.size == 4096 * (n + 1) and buf.name == f"t{n}-{i}"
                        assert buf.handle is not None and os.fstat(buf.handle)
                        buf.close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert dev.buffers() == []


async def test_a_trio_send_to_a_full_socket_times_out_too(broker: Broker) -> None:
    async with bufbroker.open_device("t", socket=broker.socket, timeout=0.5) as dev:
        os.kill(broker.pid, signal.SIGSTOP)
        got: list[int | None] = []

        async def ping() -> None:
            try:
                await dev.ping()
            except bufbroker.BrokerError as e:
                got.append(e.errno)

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(2000):  # more than the broker's receive queue holds
                        nursery.start_soon(ping)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert got == [errno.ETIMEDOUT] * 2000
        with trio.fail_after(10):
            await dev.ping()


def test_connect_to_a_full_listener_times_out(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(0)
    queued = []
    try:
        while True:  # fill the accept queue: the next connect would wait for room
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            queued.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        start = time.monotonic()
        with pytest.raises(bufbroker.BrokerError) as e:
            bufbroker.connect("late", socket=path, timeout=0.3)
        expect_timeout(e, path)
        assert time.monotonic() - start < 10
    finally:
        for s in queued:
            s.close()
        listener.close()
