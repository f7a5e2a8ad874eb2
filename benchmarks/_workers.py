"""Child processes for the benchmarks: ``python -m benchmarks._workers ROLE ARGS``.

- ``consumer CTL_FD BROKER_SOCKET``: the receiving side of the hand-off cases;
- ``trio-server PATH``: the floor of this stack, a bare trio SOCK_SEQPACKET request/response
  server speaking the broker's message shape (msgpack ``[0, id, op, args]`` → ``[1, id, {}]``);
- ``echo FD``: the floor of Python, a blocking socketpair ping-pong;
- ``eventfd-echo IN OUT``: the floor of a fence wake-up, a blocking eventfd ping-pong;
- ``timeline-echo FD BROKER_SOCKET``: receives a timeline handle over FD, sends back one of its
  own, then waits for each point of the first and signals the same point on its own;
- ``tcp-sender BROKER_SOCKET NAME``: the floor of the Flight cases, a raw TCP copy over loopback:
  prints its port, then sends the named buffer's bytes, straight from a mapping, to every
  connection (each on a thread of its own, so that connections at once are served at once);
- ``load KIND SOCKET SECONDS START``: a client doing round trips for a while, printing its count
  (KIND: ``broker``, our client; ``bare``, the floor's client against the bare server;
  ``broker-bare-client``, the floor's client against the broker, once registered).
"""

from __future__ import annotations

import mmap
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory

import msgpack

PAGE = mmap.PAGESIZE


def _read_ends(view: memoryview | mmap.mmap, size: int) -> None:
    """Read the first and the last page, as a consumer checking a frame would."""
    bytes(view[:PAGE])
    bytes(view[size - PAGE : size])


def consumer(ctl_fd: str, broker_socket: str) -> None:
    import bufbroker
    from bufbroker import Direction

    ctl = socket.socket(fileno=int(ctl_fd))
    pipe = bytearray(1 << 20)
    with bufbroker.connect("bench-consumer", socket=broker_socket) as dev:
        while True:
            data, ancdata, _, _ = ctl.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            if not data:
                return
            if data == b"ready?":  # wakes us up before a timed hand-off, for every case alike
                ctl.send(b"ready")
                continue
            case, size, name = msgpack.unpackb(data)
            fds = [
                int.from_bytes(d[i : i + 4], sys.byteorder)
                for _, _, d in ancdata
                for i in range(0, len(d), 4)
            ]
            if case == "bufbroker":  # import, attach and map in one round trip
                buf = dev.import_handle(fds[0], map=Direction.TO_DEVICE)
                os.close(fds[0])
                assert buf.mapping is not None
                _read_ends(buf.mapping.memory, size)
                done = time.perf_counter_ns()
                buf.close()  # unmap, detach, release: sent, not waited for
            elif case == "memfd":
                view = mmap.mmap(fds[0], size, prot=mmap.PROT_READ)
                os.close(fds[0])
                _read_ends(view, size)
                done = time.perf_counter_ns()
                view.close()
            elif case == "shared_memory":
                shm = shared_memory.SharedMemory(name)
                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
                assert shm.buf is not None
                _read_ends(shm.buf, size)
                done = time.perf_counter_ns()
                shm.close()
            elif case == "pipe":
                with os.fdopen(fds[0], "rb", buffering=0) as r:
                    left = size
                    while left:
                        n = r.readinto(memoryview(pipe)[: min(left, len(pipe))])
                        if not n:
                            raise EOFError
                        left -= n
                done = time.perf_counter_ns()
            # The reply goes after the cleanup above: freeing a GiB takes a while, and it must
            # not overlap the next case's timing.
            ctl.send(msgpack.packb(done))


def trio_server(path: str) -> None:
    import trio

    async def serve_one(sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                data = await sock.recv(65536)
                if not data:
                    return
                _, id, _, _ = msgpack.unpackb(data)
                await sock.send(msgpack.packb([1, id, {}]))

    async def main() -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await listener.bind(path)
        listener.listen(256)
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(serve_one, sock)

    trio.run(main)


def echo(fd: str) -> None:
    sock = socket.socket(fileno=int(fd))
    while data := sock.recv(4096):
        sock.send(data)


def eventfd_echo(fd_in: str, fd_out: str) -> None:
    while True:
        os.eventfd_read(int(fd_in))
        os.eventfd_write(int(fd_out), 1)


def timeline_echo(fd: str, broker_socket: str) -> None:
    import bufbroker

    sock = socket.socket(fileno=int(fd))
    with bufbroker.connect("timeline-echo", socket=broker_socket) as dev:
        handle = bufbroker.recv_handle(sock)
        theirs = dev.import_timeline(handle)
        os.close(handle)
        mine = dev.timeline(name="echo")
        handle = mine.share()
        bufbroker.send_handle(sock, handle)
        os.close(handle)
        point = 1
        while True:
            theirs.wait(point)
            mine.signal(point)
            point += 1


def bare_round_trip(sock: socket.socket, id: int) -> None:
    sock.send(msgpack.packb([0, id, "ping", {}]))
    msgpack.unpackb(sock.recv(65536))


def load(kind: str, path: str, seconds: str, start: str) -> None:
    """Round trips from ``start`` (a perf_counter timestamp) for ``seconds``; prints the count."""
    import bufbroker

    op: Callable[[], object]
    if kind == "broker":
        dev = bufbroker.connect("load", socket=path)
        op = dev.ping
    elif kind == "broker-bare-client":  # registered, then the floor's own client on the same socket
        dev = bufbroker.connect("load", socket=path)
        sock = socket.socket(fileno=os.dup(dev.fileno()))
        op = lambda: bare_round_trip(sock, 1)  # noqa: E731
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        op = lambda: bare_round_trip(sock, 1)  # noqa: E731
    while time.perf_counter() < float(start):
        time.sleep(0.001)
    end = float(start) + float(seconds)
    count = 0
    while time.perf_counter() < end:
        op()
        count += 1
    print(count, flush=True)


def tcp_sender(broker_socket: str, name: str) -> None:
    import bufbroker
    from bufbroker import Direction

    with bufbroker.connect("bench-tcp-sender", socket=broker_socket) as dev:
        buf = dev.open(name)
        with buf.attach() as att, att.map(Direction.TO_DEVICE) as m:
            data = m.memory[: buf.size]
            listener = socket.create_server(("127.0.0.1", 0))
            print(listener.getsockname()[1], flush=True)
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=_send_all, args=(conn, data), daemon=True).start()


def _send_all(conn: socket.socket, data: memoryview) -> None:
    with conn:
        conn.sendall(data)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles: dict[str, Callable[..., None]] = {
        "consumer": consumer,
        "trio-server": trio_server,
        "echo": echo,
        "eventfd-echo": eventfd_echo,
        "timeline-echo": timeline_echo,
        "load": load,
        "tcp-sender": tcp_sender,
    }
    roles[role](*args)
