"""A hostile local user: each attack that once froze, exhausted or deceived the broker.

Each test mounts one attack against a real broker and checks that the victim is unharmed: its
request is answered at once (measured against what the attack would cost it), or it succeeds
where it once failed. docs/RELIABILITY.md, "A hostile user", lists them with what each did before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
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
from bufbroker import Access, Constraints, Direction
from bufbroker.protocol import MAX_REPLY_BYTES

from conftest import Broker, Peer, RawClient

ATTACKER = str(Path(__file__).with_name("attacker.py"))


@pytest.fixture
def attacker(other_uid: int) -> Iterator[Callable[..., Peer]]:
    """Runs a role of attacker.py as another uid; each is stopped (by pid) at the end."""
    started: list[Peer] = []

    def run(role: str, *args: object, pass_fds: tuple[int, ...] = (), uid: int = other_uid) -> Peer:
        started.append(Peer.start(ATTACKER, role, uid, *args, pass_fds=pass_fds))
        return started[-1]

    yield run
    for p in started:
        p.stop()


def _ping_time(dev: bufbroker.Device) -> float:
    start = time.perf_counter()
    dev.ping()
    return time.perf_counter() - start


# --- descriptors whose close() blocks --------------------------------------------------------


@contextlib.contextmanager
def _lingering_socket(seconds: int) -> Iterator[int]:
    """A TCP socket over loopback with unsent data and SO_LINGER: its last close() waits."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1)
    client = socket.create_connection(listener.getsockname())
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.setblocking(False)
        sent = -1
        while sent:  # nobody accepts, so nobody reads: fill until the peer's window is shut
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sent += client.send(b"x" * 65536)
            time.sleep(0.1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, seconds))
        yield client.detach()
    finally:
        listener.close()  # resets the connection: a close still lingering then returns
        client.close()


@contextlib.contextmanager
def _stopped(broker: Broker) -> Iterator[None]:
    """The broker stopped (SIGSTOP) for the block: what is sent meanwhile waits in its socket."""
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


def _send_last_copy(broker: Broker, client: RawClient, id: int, fd: int) -> None:
    """Send ``fd`` as a surplus descriptor with a ping, so that the broker's copy is the last one."""
    with _stopped(broker):
        client.request(id, "ping", {}, (fd,))
        os.close(fd)  # before the broker can close its own: its close() is the last


def test_a_lingering_socket_sent_as_a_surplus_descriptor_stalls_nobody(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    """Its last close() blocks for the linger; the broker closes it off its loop."""
    with _lingering_socket(2) as fd:  # the attack is real: such a close waits out the linger
        start = time.perf_counter()
        os.close(fd)
        assert time.perf_counter() - start > 1.5
    with broker.connect("bystander") as bystander, _lingering_socket(30) as fd:
        bystander.ping()
        attack = raw(broker)
        attack.hello()
        _send_last_copy(broker, attack, 1, fd)
        assert attack.recv()[:2] == [1, 1]
        assert _ping_time(bystander) < 5  # the loop would be stuck for 30 s
        with broker.connect("newcomer") as dev:
            dev.allocate(4096).close()


def _populated_memfd(size: int) -> int:
    fd = os.memfd_create("populated")
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        for offset in range(0, size, 4096):
            m[offset] = 1
    return fd


def test_a_populated_memfd_sent_as_a_surplus_descriptor_stalls_nobody(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    """Closing the last reference to written memory frees it inside close(), on the caller's time.

    The stall it would cause is measured here first, by closing an identical memfd; a
    bystander's ping sent right after the broker answered the attack must take well under it.
    """
    size = 512 << 20
    fd = _populated_memfd(size)
    start = time.perf_counter()
    os.close(fd)
    stall = time.perf_counter() - start
    with broker.connect("bystander") as bystander:
        attack = raw(broker)
        attack.hello()
        pings = []
        for n in range(3):
            _send_last_copy(broker, attack, n, _populated_memfd(size))
            assert attack.recv()[:2] == [1, n]
            pings.append(_ping_time(bystander))
        assert min(pings) < stall / 2, (pings, stall)


def test_a_waiting_open_holds_none_of_its_request_descriptors(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    waiting = raw(broker)
    waiting.hello()
    before = broker.fd_count()
    pipes = [os.pipe() for _ in range(8)]
    for n in range(8):
        fds = tuple(fd for pair in pipes for fd in pair)
        waiting.request(n, "open", {"name": f"later-{n}", "timeout": 60}, fds)
    for pair in pipes:
        for fd in pair:
            os.close(fd)
    broker.wait_for(lambda: broker.fd_count() == before)  # 8 opens wait, holding nothing
    with broker.connect("maker") as maker:
        maker.ping()
        waiting.request(99, "ping", {})
        assert waiting.recv()[:2] == [1, 99]  # still waiting, not answered
        maker.allocate(4096, name="later-3")
        reply = waiting.recv()
        assert reply[:2] == [1, 3]


# --- handles ---------------------------------------------------------------------------------


def test_handles_are_charged_per_uid(broker_factory: Callable[..., Broker], other_uid: int) -> None:
    b = broker_factory("--max-handles-per-uid", "5")
    with b.connect("a") as dev:
        buf = dev.allocate(4096)  # its own handle is the first
        handles = [buf.share() for _ in range(4)]
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.share()
        assert e.value.errno == errno.EDQUOT and "max_handles_per_uid" in str(e.value)
        with pytest.raises(bufbroker.BrokerError) as e:
            dev.allocate(4096)  # would mint a handle too: refused, and nothing is left behind
        assert e.value.errno == errno.EDQUOT
        assert [x["id"] for x in dev.buffers()] == [buf.id]
        os.close(handles.pop())
        b.wait_for(lambda: dev.stats()["usage"]["handles"] == 4)
        handles.append(buf.share())
        assert dev.stats()["usage"]["handles"] == 5
        for fd in handles:
            os.close(fd)


def test_one_uid_filling_the_descriptor_table_leaves_root_its_reserve(
    broker_factory: Callable[..., Broker], attacker: Callable[..., Peer]
) -> None:
    b = broker_factory("--max-handles-per-uid", "100000", "--fd-reserve", "64", nofile=400)
    hoarder = attacker("fill_handles", b.socket)
    report = json.loads(hoarder.line())
    assert report["errno"] == errno.EMFILE and not report.get("own"), report
    assert 250 < report["shared"] < 400 - 64
    with b.connect("root") as root:  # connects, allocates, maps, shares: all within the reserve
        buf = root.allocate(1 << 20, name="after")
        with buf.cpu_access(Access.WRITE) as mem:
            mem[:2] = b"ok"
        handle = buf.share()
        with b.connect("root-too") as other:
            theirs = other.import_handle(handle)
            with theirs.attach() as att, att.map(Direction.TO_DEVICE) as m:
                assert bytes(m.memory[:2]) == b"ok"
        os.close(handle)


def test_holders_cannot_write_into_a_handle(broker: Broker) -> None:
    """The broker's end is shut down for reading: nothing queues up that it would have to drain."""
    with broker.connect() as dev:
        buf = dev.allocate(4096)
        end = socket.socket(fileno=buf.share())
        with pytest.raises(BrokenPipeError):
            end.send(b"junk")
        memfd = os.memfd_create("x")
        with pytest.raises(BrokenPipeError):
            socket.send_fds(end, [b"x"], [memfd, end.fileno()])  # not even into itself
        os.close(memfd)
        end.close()
        buf.close()
        broker.wait_for(lambda: dev.buffers() == [])


def test_a_handle_is_its_socket_cookie(broker: Broker) -> None:
    """Handles are known by SO_COOKIE, which the kernel never reuses, not by the inode number."""
    from bufbroker.broker._sockdiag import socket_cookie

    with broker.connect() as a, broker.connect() as b:
        buf = a.allocate(4096)
        handle = buf.share()
        other, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert socket_cookie(handle) != socket_cookie(other.fileno())
        with pytest.raises(bufbroker.BrokerError) as e:
            b.import_handle(other.fileno())  # a socket, but not a handle
        assert e.value.errno == errno.EINVAL
        assert b.import_handle(handle).id == buf.id
        other.close()
        peer.close()
        os.close(handle)


# --- layouts ---------------------------------------------------------------------------------


def test_a_layout_of_a_million_segments_is_refused_at_attach_at_once(broker: Broker) -> None:
    """4 KiB segments of 4 GiB: refused by arithmetic before anything is fixed or allocated."""
    with (
        broker.connect("tiny", constraints=Constraints(max_segment_size=4096)) as tiny,
        broker.connect("bystander") as bystander,
    ):
        buf = tiny.allocate(4 << 30)
        for _ in range(3):
            with pytest.raises(bufbroker.BrokerError) as e:
                buf.attach()
            assert e.value.errno == errno.EMSGSIZE and "max_segment_size" in str(e.value)
        [entry] = bystander.buffers()
        assert entry["layout"] is None and entry["attachments"] == []  # nothing was fixed
        handle = buf.share()
        with broker.connect("sane") as sane:
            theirs = sane.import_handle(handle)
            with theirs.attach() as att, att.map(Direction.TO_DEVICE) as m:
                assert m.segments == [bufbroker.Segment(0, 4 << 30)]
            theirs.close()
        os.close(handle)


# --- names -----------------------------------------------------------------------------------


def test_waiting_opens_are_woken_by_their_own_name_only(broker_factory: Callable[..., Broker]) -> None:
    """Thousands of waiting opens once made every named allocate or rename wake them all."""
    b = broker_factory("--max-waiting-opens-per-uid", "10000", "--max-pending-requests", "1000")
    with b.connect("renamer") as dev:
        buf = dev.allocate(4096)

        def renames() -> float:
            start = time.perf_counter()
            for n in range(200):
                buf.set_name(f"name-{n}")
            return time.perf_counter() - start

        quiet = min(renames() for _ in range(3))
        waiters = []
        for c in range(5):
            client = RawClient(b.socket)
            client.hello()
            for n in range(600):
                client.request(n, "open", {"name": f"waited-{c}-{n}", "timeout": 120})
            waiters.append(client)
        b.wait_for(lambda: dev.stats()["usage"]["waiting"] == 3000, timeout=30)
        crowded = min(renames() for _ in range(3))
        for client in waiters:
            client.close()
        assert crowded < 5 * quiet, (crowded, quiet)


def test_waiting_opens_are_charged_per_uid(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory("--max-waiting-opens-per-uid", "3")
    waiting = RawClient(b.socket)
    waiting.hello()
    for n in range(3):
        waiting.request(n, "open", {"name": f"w{n}", "timeout": 60})
    waiting.request(3, "open", {"name": "w3", "timeout": 60})
    reply = waiting.recv()
    assert reply[:2] == [2, 3] and reply[2]["errno"] == errno.EDQUOT
    with b.connect("maker") as maker:
        maker.allocate(4096, name="w1")
        assert waiting.recv()[:2] == [1, 1]
    waiting.close()


def test_names_cannot_be_hijacked_or_probed(
    broker: Broker, attacker: Callable[..., Peer], other_uid: int
) -> None:
    """A read-only holder of another uid once renamed the owner's buffer and took its name."""
    with broker.connect("owner") as owner:
        frame = owner.allocate(4096, name="frame0")
        owner.allocate(4096, name="frame0-private")
        handle = frame.share(readonly=True)
        squatter = attacker("squat", broker.socket, handle, "frame0", pass_fds=(handle,))
        os.close(handle)
        seen = json.loads(squatter.line())
        assert seen["renamed"] == errno.EACCES  # read-only: no rename
        # Another uid's name answers exactly as a missing one.
        assert seen["probes"] == {"frame0-private": errno.ENOENT, "no-such-name": errno.ENOENT}
        # What it sees of root's buffer: no name, no exporter, no root device or pid.
        assert seen["imported"] == {"name": None, "exporter": None}
        [theirs] = [x for x in seen["buffers"] if x["id"] == frame.id]
        assert theirs["name"] is None and theirs["exporter"]["pid"] is None
        assert all(i["name"] == "squatter" for i in theirs["importers"])
        assert [d["name"] for d in seen["devices"]] == ["squatter"]
        # Its own "frame0" lives in its own names: root's open still finds root's buffer.
        with broker.connect("reader") as reader:
            assert reader.open("frame0").id == frame.id
            assert reader.open("frame0", uid=other_uid).id == seen["mine"]
        assert [x["name"] for x in owner.buffers() if x["id"] == frame.id] == ["frame0"]


# --- connections -----------------------------------------------------------------------------


def test_silent_connections_are_limited_per_uid(
    broker_factory: Callable[..., Broker], attacker: Callable[..., Peer]
) -> None:
    """One uid's silent connections once took every handshake slot and locked root out."""
    b = broker_factory("--max-incomplete-connections", "12", "--handshake-timeout", "60")
    first = attacker("silent", b.socket, 20)
    report = json.loads(first.line())
    assert report == {"kept": 8, "refused": 12}  # max_incomplete_connections_per_uid
    second = attacker("silent", b.socket, 20, uid=65533)
    report = json.loads(second.line())
    assert report == {"kept": 4, "refused": 16}  # the global limit, for all other uids
    for _ in range(20):  # root is held back by its own handshakes only
        with b.connect("root") as root:
            root.ping()


def test_the_command_name_is_read_without_the_peers_memory_lock(broker: Broker) -> None:
    """/proc/<pid>/cmdline waits on the peer's memory lock; comm does not."""
    with broker.connect("me") as dev:
        [me] = dev.devices()
        assert me["command"] == Path("/proc/self/comm").read_text().strip()


# --- export_memfd ----------------------------------------------------------------------------


def _sealed_memfd(size: int, seals: int, flags: int = 0) -> int:
    fd = os.memfd_create("mine", os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_export_memfd_requires_the_size_sealed_both_ways(
    broker: Broker, raw: Callable[[Broker], RawClient]
) -> None:
    """Without F_SEAL_GROW it could grow past what it was charged (4 GiB against 128 MiB)."""
    c = raw(broker)
    c.hello()
    fd = _sealed_memfd(4096, fcntl.F_SEAL_SHRINK)
    c.request(1, "export_memfd", {}, (fd,))
    reply = c.recv()
    assert reply[0] == 2 and reply[2]["errno"] == errno.EINVAL and "F_SEAL_GROW" in reply[2]["message"]
    os.ftruncate(fd, 1 << 30)  # what it would have done
    os.close(fd)
    with broker.connect() as dev:  # the client seals it against growing itself
        fd = _sealed_memfd(4096, fcntl.F_SEAL_SHRINK)
        buf = dev.export_memfd(fd)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_GROW
        with pytest.raises(OSError):
            os.ftruncate(fd, 1 << 30)
        buf.close()
        os.close(fd)


def test_export_memfd_refuses_hugetlb(broker: Broker, raw: Callable[[Broker], RawClient]) -> None:
    """A hole punched in a hugetlb memfd SIGBUSes its readers; shmem would read zeros."""
    fd = _sealed_memfd(2 << 20, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, os.MFD_HUGETLB)
    c = raw(broker)
    c.hello()
    c.request(1, "export_memfd", {}, (fd,))
    reply = c.recv()
    assert reply[0] == 2 and reply[2]["errno"] == errno.EINVAL and "hugetlb" in reply[2]["message"]
    os.close(fd)


# --- the protocol's bounds -------------------------------------------------------------------


def test_every_listing_page_fits_the_largest_reply(broker: Broker) -> None:
    """A client that sizes its receive buffer by the protocol's MAX_REPLY_BYTES never truncates."""
    with broker.connect("x" * 31) as dev:
        buffers = [dev.allocate(4096, name=f"{n:031d}") for n in range(200)]
        attachments = [buf.attach() for buf in buffers for _ in range(5)]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(broker.socket)
        sock.send(msgpack.packb([0, 1, "hello", {"version": 1, "name": "lister"}]))
        sock.recv(MAX_REPLY_BYTES)
        after, sizes = 0, []
        while True:
            sock.send(msgpack.packb([0, 2, "buffers", {"after": after}]))
            data, _, flags, _ = sock.recvmsg(MAX_REPLY_BYTES)
            assert not flags & socket.MSG_TRUNC and len(data) <= MAX_REPLY_BYTES
            result = msgpack.unpackb(data)[2]
            sizes.append(len(data))
            if not result["more"]:
                break
            after = result["buffers"][-1]["id"]
        assert len(sizes) >= 2 and max(sizes) > MAX_REPLY_BYTES // 2  # pages are filled, not tiny
        sock.close()
        for att in attachments:
            att.detach()


def test_an_empty_packet_is_answered_with_eproto(broker: Broker, raw: Callable[[Broker], RawClient]) -> None:
    c = raw(broker)
    c.hello()
    c.send(b"")
    reply = c.recv()
    assert reply[0] == 2 and reply[1] is None and reply[2]["errno"] == errno.EPROTO
    assert c.recv() is None


def test_shut_down_handles_are_looked_up_in_a_worker_thread() -> None:
    """Each lookup walks the kernel's socket table: never on the broker's loop."""
    import trio

    from bufbroker.broker._handles import HandleTable
    from bufbroker.broker._sockdiag import SocketDiag

    threads: set[int] = set()

    class Watched(SocketDiag):
        def exists(self, ino: int, cookie: int) -> bool:
            threads.add(threading.get_ident())
            return super().exists(ino, cookie)

    closed: list[int] = []

    async def main() -> None:
        table = HandleTable(closed.append)
        assert table._diag is not None
        table._diag.close()
        table._diag = Watched()
        threads.clear()  # of its own start-up check
        _, theirs, _ = table.mint(1000)
        holder = socket.socket(fileno=theirs)
        holder.recv(1)  # read the byte: the last close will not reset the broker's end
        copy = os.dup(theirs)
        holder.shutdown(socket.SHUT_RDWR)  # what a rude holder does: looks like a close
        holder.close()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(table.watch)
            await trio.sleep(0.3)
            assert closed == [] and threads and trio.lowlevel.current_root_task() is not None
            os.close(copy)  # now it is gone; found at the next look
            with trio.fail_after(5):
                while not closed:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        table.close()

    trio.run(main)
    assert closed and threading.get_ident() not in threads
