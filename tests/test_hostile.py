"""Bad input gets its errno or a closed connection; every received fd is closed; others carry on."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

import bufbroker
from bufbroker.broker._connection import FAIRNESS

from conftest import Broker, RawClient, start_broker


@pytest.fixture
def bystander(broker: Broker) -> Iterator[bufbroker.Device]:
    """A well-behaved client that must see nothing of what the others do."""
    with broker.connect("bystander") as dev:
        buf = dev.allocate(4096, name="bystander")
        yield dev
        assert [b["id"] for b in dev.buffers()] == [buf.id]
        dev.ping()


@pytest.mark.parametrize(
    "packet",
    [
        b"\xc1garbage",
        b"",
        msgpack.packb("not an array"),
        msgpack.packb([9, 1, "ping", {}]),
        msgpack.packb([0, -1, "ping", {}]),
        msgpack.packb([0, 1, 7, {}]),
        msgpack.packb([0, 1, "ping", []]),
        msgpack.packb([1, 1, {}]),  # clients do not send replies
        msgpack.packb([0, 1, "ping", {}]) + b"\x00",  # trailing bytes
        b"\x91" * 10000,  # nesting
    ],
)
def test_malformed_packets_close_the_connection_with_eproto(
    broker: Broker, raw: Callable[[Broker], RawClient], bystander: bufbroker.Device, packet: bytes
) -> None:
    c = raw(broker)
    c.hello()
    c.send(packet)
    reply = c.recv()  # an empty packet too: it is not the end of file
    assert reply[0] == 2 and reply[1] is None and reply[2]["errno"] == errno.EPROTO
    assert c.recv() is None


def test_first_message_must_be_hello(
    broker: Broker, raw: Callable[[Broker], RawClient], bystander: bufbroker.Device
) -> None:
    c = raw(broker)
    c.request(1, "ping", {})
    reply = c.recv()
    assert reply[0] == 2 and reply[2]["errno"] == errno.EPROTO
    assert c.recv() is None
    d = raw(broker)
    d.request(1, "hello", {"version": 99, "name": "future"})
    assert d.recv()[2]["errno"] == errno.EPROTONOSUPPORT


@pytest.mark.parametrize(
    ("op", "args", "expected"),
    [
        ("no_such_op", {}, errno.ENOTTY),
        ("allocate", {"size": "big"}, errno.EINVAL),
        ("allocate", {"size": (1 << 64) - 1}, errno.EINVAL),
        ("allocate", {"size": -5}, errno.EINVAL),
        ("allocate", {}, errno.EINVAL),
        ("allocate", {"size": 4096, "colour": "red"}, errno.EINVAL),
        ("allocate", {"size": 4096, "heap": "nope"}, errno.ENODEV),
        ("map", {"attachment": 1, "direction": "sideways"}, errno.EINVAL),
        ("map", {"attachment": 12345, "direction": "to_device"}, errno.EINVAL),
        ("cpu_begin", {"buffer": 1, "access": "execute"}, errno.EINVAL),
        ("release", {"buffer": 999}, errno.EBADF),
        ("open", {"name": "x", "timeout": -1}, errno.EINVAL),
        ("import", {}, errno.EBADF),
    ],
)
def test_bad_requests_get_their_errno_and_the_connection_stays(
    broker: Broker,
    raw: Callable[[Broker], RawClient],
    bystander: bufbroker.Device,
    op: str,
    args: dict[str, object],
    expected: int,
) -> None:
    c = raw(broker)
    c.hello()
    c.request(5, op, args)
    reply = c.recv()
    assert reply[0] == 2 and reply[1] == 5 and reply[2]["errno"] == expected, reply
    assert reply[2]["code"] == errno.errorcode[expected]
    c.request(6, "ping", {})
    assert c.recv()[:2] == [1, 6]


def _fds_of_every_kind() -> list[int]:
    r, w = os.pipe()
    a, b = socket.socketpair()
    memfd = os.memfd_create("junk")
    return [
        r,
        w,
        a.detach(),
        b.detach(),
        memfd,
        os.open("/dev/null", os.O_RDWR),
        os.open(__file__, os.O_RDONLY),
    ]


def test_every_received_fd_is_closed(
    broker: Broker, raw: Callable[[Broker], RawClient], bystander: bufbroker.Device
) -> None:
    c = raw(broker)
    c.hello()
    before = broker.fd_count()
    for fd in _fds_of_every_kind():
        c.request(1, "import", {}, (fd,))  # not a handle: EINVAL
        assert c.recv()[2]["errno"] == errno.EINVAL
        c.request(2, "ping", {}, (fd,))  # a surplus fd
        assert c.recv()[:2] == [1, 2]
        c.request(3, "export_memfd", {}, (fd,))
        assert c.recv()[0] == 2
        c.request(4, "nonsense", {}, (fd,))
        assert c.recv()[2]["errno"] == errno.ENOTTY
        c.send(b"\xc1", (fd,))  # malformed, with an fd: closed with the connection
        assert c.recv()[2]["errno"] == errno.EPROTO
        os.close(fd)
        c.close()
        c = raw(broker)
        c.hello()
    broker.wait_for(lambda: broker.fd_count() == before)


def test_a_copy_of_a_handle_keeps_its_buffer_alive(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        handle = buf.share()
        buf.close()
        dup = os.dup(handle)
        os.close(handle)
        c = raw(broker)
        c.hello()
        c.request(1, "import", {}, (dup,))
        assert c.recv()[0] == 1  # dup keeps the handle alive: it imports
        os.close(dup)
        c.request(2, "release", {"buffer": buf.id})
        assert c.recv()[0] == 1
        broker.wait_for(lambda: dev.buffers() == [])


def test_a_dead_handle_does_not_import(
    broker_factory: Callable[..., Broker], raw: Callable[[Broker], RawClient]
) -> None:
    """A handle is dead once the broker's end of its pair is closed.

    While any copy of a handle is open its buffer lives, so a live broker never closes its end
    under a holder; but a broker that stops (a restart with no service manager keeps nothing)
    closes every end it had. Its clients still hold open sockets that look like handles: the
    broker that comes back, at the same path, must refuse them with EINVAL. So must it refuse
    a live handle of another broker (handles belong to the broker that minted them), and a
    bare socketpair end whose peer is gone, which is all a dead handle is to the kernel.
    """
    first = broker_factory()
    with first.connect("before") as dev:
        buf = dev.allocate(4096, name="frame")
        dead = [buf.share(), buf.share(readonly=True)]
    assert first.stop() == 0  # every handle it minted is dead now
    other = broker_factory()
    foreign = other.connect("elsewhere")
    live_elsewhere = foreign.allocate(4096).share()
    orphan, gone = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gone.close()
    again = start_broker(Path(first.socket).parent)  # the same path: a restart
    try:
        c = raw(again)
        c.hello()
        before = again.fd_count()
        for n, fd in enumerate([*dead, live_elsewhere, orphan.fileno()]):
            c.request(n, "import", {}, (fd,))
            reply = c.recv()
            assert reply[:2] == [2, n] and reply[2]["errno"] == errno.EINVAL, reply
        c.request(99, "ping", {})
        assert c.recv()[:2] == [1, 99]
        again.wait_for(lambda: again.fd_count() == before)  # each received copy was closed
        with again.connect("after") as dev:
            assert dev.buffers() == []
            with pytest.raises(bufbroker.BrokerError) as e:
                dev.open("frame")  # the name died with the buffer
            assert e.value.errno == errno.ENOENT
        # The other broker's handle was refused here, and is still good where it was minted.
        assert foreign.import_handle(live_elsewhere).size == 4096
    finally:
        assert again.stop() == 0
        for fd in [*dead, live_elsewhere]:
            os.close(fd)
        orphan.close()
        foreign.close()


@pytest.mark.parametrize("how", [socket.SHUT_WR, socket.SHUT_RDWR])
def test_a_holder_that_shuts_its_handle_down_does_not_end_it(broker: Broker, how: int) -> None:
    """shutdown() on one copy looks, from the broker's end, just like the last close."""
    with broker.connect("a") as a, broker.connect("b") as b:
        buf = a.allocate(4096, name="kept")
        handle = buf.share()
        kept = os.dup(handle)  # what another holder would still have
        rude = socket.socket(fileno=handle)
        rude.shutdown(how)
        rude.close()
        a.ping()
        buf.close()  # the device lets go; only `kept` holds the buffer now
        time.sleep(0.2)  # the broker has long seen the hang-up by now
        theirs = b.import_handle(kept)
        assert [x["name"] for x in b.buffers()] == ["kept"]
        theirs.close()
        os.close(kept)  # the last copy: now it goes, once the broker looks again
        broker.wait_for(lambda: b.buffers() == [])


def test_many_handles_shut_down_and_closed_at_once(broker: Broker) -> None:
    """More hang-ups at once than are looked up one by one: the kernel's table is read whole."""
    with broker.connect("a") as a, broker.connect("b") as b:
        buffers = [a.allocate(4096) for _ in range(40)]
        handles = [buf.share() for buf in buffers]
        kept = [os.dup(h) for h in handles]
        for h in handles:
            rude = socket.socket(fileno=h)
            rude.shutdown(socket.SHUT_RDWR)
            rude.close()
        for buf in buffers:
            buf.close()
        a.ping()
        time.sleep(0.2)
        assert len(a.buffers()) == 40  # each still held by its kept copy
        theirs = b.import_handle(kept[-1])
        theirs.close()
        for fd in kept:
            os.close(fd)
        broker.wait_for(lambda: a.buffers() == [])


def test_hundreds_of_handles_closed_at_once(broker: Broker) -> None:
    """More hang-ups than one epoll round returns: each round is dealt with before the next."""
    with broker.connect("a") as a:
        buffers = [a.allocate(4096) for _ in range(300)]
        handles = [buf.share() for buf in buffers]
        for buf in buffers:
            buf.close()  # only the shared handles hold them now
        a.ping()
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            for fd in handles:
                os.close(fd)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        broker.wait_for(lambda: a.buffers() == [])
        a.ping()


def test_a_handle_shut_down_then_closed_goes_without_other_traffic(broker: Broker) -> None:
    """Found shut down by a request, not by the watcher: the watcher still looks again."""
    with broker.connect("a") as a:
        buf = a.allocate(4096)
        end = socket.socket(fileno=buf.share())
        buf.close()  # only `end` holds the buffer now
        end.shutdown(socket.SHUT_RDWR)
        a.stats()  # takes the hang-up on the request path: the handle is only shut down
        before = broker.fd_count()
        end.close()  # and nothing more is sent
        broker.wait_for(lambda: broker.fd_count() < before)  # its end closed: the buffer went
        assert a.buffers() == []


SO_TIMESTAMPNS = 35  # asm-generic/socket.h (Python has no name for it): the kernel's send time


def _reply_stamp(client: RawClient) -> int:
    """The next packet, checked to be a reply, and when the broker sent it (ns, realtime)."""
    data, ancdata, _, _ = client.sock.recvmsg(1 << 16, 64)
    if not data:
        raise EOFError
    assert msgpack.unpackb(data)[0] == 1
    (stamp,) = [data for level, kind, data in ancdata if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)]
    seconds, nanoseconds = struct.unpack("qq", stamp)
    return int(seconds) * 1_000_000_000 + int(nanoseconds)


def test_a_connection_that_keeps_requests_queued_takes_turns_with_the_others(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    """While one peer keeps requests queued without pause, another's is answered within a few
    of the flood's turns (FAIRNESS requests each), counted by the kernel's timestamps on the
    replies rather than by when this test gets to run.
    """
    flooder, bystander = raw(broker), raw(broker)
    for client in (flooder, bystander):
        client.hello()
        client.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    stop = threading.Event()
    stamps: list[int] = []  # when the flood's replies were sent

    def send() -> None:
        with contextlib.suppress(OSError):  # the shutdown below ends the flood
            while not stop.is_set():
                flooder.request(1, "ping", {})

    def read() -> None:
        with contextlib.suppress(OSError, EOFError):
            while not stop.is_set():
                stamps.append(_reply_stamp(flooder))

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "the flood stalled"
            time.sleep(0.001)

    threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=read, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(stamps) > 100)
        asked = time.time_ns()
        bystander.request(2, "ping", {})
        answered = _reply_stamp(bystander)  # a starved bystander times out here
        wait_for(lambda: stamps[-1] > answered)  # the flood went on after it
    finally:
        stop.set()
        flooder.sock.shutdown(socket.SHUT_RDWR)  # wakes both threads
        for thread in threads:
            thread.join(timeout=10)
    # The flood's turn under way when the request came, the next (the bystander's task is
    # not yet counted as awake when it is woken), and slack for the turn the test caught.
    assert sum(asked < stamp < answered for stamp in stamps) <= 3 * FAIRNESS
