"""What a transfer holds is let go when gRPC lets go: after success, cancel, or a lost peer.

Proved by the brokers' own listings: the served buffer has no attachment and no extra handle
left, no connection of the service remains, and the receiving broker holds nothing from a
transfer that did not complete.
"""

from __future__ import annotations

import errno
import json
import signal
import struct
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.flight as fl
import pytest

import bufbroker
import bufbroker.flight as bf

from flight_fixtures import (
    PAGE,
    Hosts,
    entries,
    entry,
    flight_devices,
    hosts,
    idle,
    pattern,
    publish,
    wait_until,
)

__all__ = ["hosts"]

MiB = 1 << 20


def test_the_service_sends_from_its_mapping_without_a_copy(hosts: Hosts) -> None:
    """The service's private memory does not grow by the buffer's size while it serves it.

    Its mapping of the buffer is shared memory (RssShmem); a copy would be anonymous (RssAnon).
    """
    service = hosts.serve("--allow", "*")
    size = 256 * MiB
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "warm", pattern(MiB))
        bf.fetch(service.location, "warm", device=b).close()  # pyarrow and gRPC warmed up
        source = a.allocate(size, name="big")
        with source.cpu_access() as memory:
            block = pattern(16 * MiB)
            for offset in range(0, size, len(block)):
                memory[offset : offset + len(block)] = block
        before = service.status("RssAnon")
        anon, shared = [before], [0]

        def sample(*_: int) -> None:
            anon.append(service.status("RssAnon"))
            shared.append(service.status("RssShmem"))

        bf.fetch(service.location, "big", device=b, progress=sample)
        sample()
        grown = (max(anon) - before) << 10
        assert grown < size // 8, f"the service's anonymous memory grew by {grown >> 20} MiB"
        # The bytes were read through the mapping: its pages showed as the service's shared memory.
        assert max(shared) << 10 > size // 2
        wait_until(lambda: idle(hosts.a, "big"))


PUSHER = """
import json, sys, bufbroker, bufbroker.flight as bf
from bufbroker import Access

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

size = int(sys.argv[3])
with bufbroker.connect("pusher", socket=sys.argv[2]) as dev:
    buf = dev.allocate(size)
    with buf.cpu_access(Access.WRITE) as memory:
        for offset in range(0, size, 1 << 20):
            memory[offset : offset + (1 << 20)] = bytes([offset >> 20 & 0xFF]) * (1 << 20)
    bf.push(sys.argv[1], buf, name="warm", chunk=1 << 20)  # pyarrow and gRPC warmed up
    anon, shared = [status("RssAnon")], [0]
    def sample(done, total):
        anon.append(status("RssAnon"))
        shared.append(status("RssShmem"))
    bf.push(sys.argv[1], buf, name="big", progress=sample)
    print(json.dumps([anon[0], max(anon), max(shared)]))
"""


def test_push_sends_from_its_mapping_without_a_copy(hosts: Hosts) -> None:
    """The pushing process's private memory does not grow by the buffer's size either."""
    service = hosts.serve("--allow-write", "*")
    size = 256 * MiB
    out = subprocess.run(
        [sys.executable, "-c", PUSHER, service.location, hosts.b.socket, str(size)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    before, peak, shared = json.loads(out.stdout)
    assert (peak - before) << 10 < size // 8, (
        f"the pusher's anonymous memory grew by {(peak - before) >> 10} MiB"
    )
    assert shared << 10 > size // 2  # it read the buffer through its mapping
    with hosts.a.connect("check") as a, a.open("big").cpu_access() as memory:
        assert bytes(memory[size - 1 : size]) == bytes([255])


def test_fetch_cancelled_by_the_caller_leaves_nothing(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "*")
    cancel = threading.Event()
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "frame", pattern(64 * MiB))
        with pytest.raises(bufbroker.BrokerError) as caught:
            bf.fetch(service.location, "frame", device=b, cancel=cancel, progress=lambda *_: cancel.set())
        assert caught.value.errno == errno.ECANCELED
        assert b.buffers() == []
        wait_until(lambda: idle(hosts.a, "frame"))


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_stream_abandoned_by_the_client_is_released(hosts: Hosts, how: str) -> None:
    service = hosts.serve("--allow", "*")
    with hosts.a.connect("camera") as a:
        publish(a, "frame", pattern(64 * MiB))
        client = fl.connect(service.location)
        reader = client.do_get(fl.Ticket(b"frame"))
        reader.read_chunk()
        assert entry(hosts.a, "frame")["attachments"]  # the service has it mapped
        if how == "cancel":
            reader.cancel()
        else:  # the client goes away without a word: its call ends with it
            client.close()
            del reader
        wait_until(lambda: idle(hosts.a, "frame"))


DROPPED = """
import sys, pyarrow.flight as fl
reader = fl.connect(sys.argv[1]).do_get(fl.Ticket(b"frame"))
reader.read_chunk()
print("reading", flush=True)
sys.stdin.read()
"""


def test_a_client_killed_mid_stream_is_released(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "*")
    with hosts.a.connect("camera") as a:
        publish(a, "frame", pattern(64 * MiB))
        client = subprocess.Popen(
            [sys.executable, "-c", DROPPED, service.location], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert client.stdout is not None and client.stdout.readline() == b"reading\n"
            assert entry(hosts.a, "frame")["attachments"]
            client.kill()
        finally:
            client.kill()
            client.wait()
            for pipe in (client.stdin, client.stdout):
                if pipe:
                    pipe.close()
        wait_until(lambda: idle(hosts.a, "frame"))


INTERRUPTED = """
import json, sys, time, bufbroker, bufbroker.flight as bf
with bufbroker.connect("interrupted", socket=sys.argv[2]) as dev:
    def slowly(done, total):
        if done == bf.CHUNK:
            print("started", flush=True)
        time.sleep(0.2)
    try:
        bf.fetch(sys.argv[1], "frame", device=dev, progress=slowly)
    except KeyboardInterrupt:
        print(json.dumps(dev.buffers()), flush=True)
"""


def test_a_fetch_interrupted_by_ctrl_c_leaves_nothing(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "*")
    with hosts.a.connect("camera") as a:
        publish(a, "frame", pattern(64 * MiB))
        child = subprocess.Popen(
            [sys.executable, "-c", INTERRUPTED, service.location, hosts.b.socket], stdout=subprocess.PIPE
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == b"started\n"
            child.send_signal(signal.SIGINT)
            assert json.loads(child.stdout.readline()) == []  # what the receiving device holds
            assert child.wait(30) == 0
        finally:
            child.kill()
            child.wait()
            if child.stdout:
                child.stdout.close()
        wait_until(lambda: entries(hosts.b) == [] and idle(hosts.a, "frame"))


def test_push_cancelled_by_the_caller_names_nothing(hosts: Hosts) -> None:
    service = hosts.serve("--allow-write", "*")
    cancel = threading.Event()
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = publish(b, "local", pattern(64 * MiB))
        with pytest.raises(bufbroker.BrokerError) as caught:
            bf.push(service.location, source, name="up", cancel=cancel, progress=lambda *_: cancel.set())
        assert caught.value.errno == errno.ECANCELED
        wait_until(lambda: entries(hosts.a) == [] and not flight_devices(hosts.a))
        assert [e["name"] for e in b.buffers()] == ["local"]
        assert not entry(hosts.b, "local")["attachments"]  # push unmapped and detached its side
        with pytest.raises(bufbroker.BrokerError) as missing:
            a.open("up")
        assert missing.value.errno == errno.ENOENT


KILLED_PUSHER = """
import sys, time, bufbroker, bufbroker.flight as bf
from bufbroker import Access
with bufbroker.connect("pusher", socket=sys.argv[2]) as dev:
    buf = dev.allocate(64 << 20)
    def slowly(done, total):
        print("started", flush=True)
        time.sleep(30)
    bf.push(sys.argv[1], buf, name="up", progress=slowly)
"""


def test_a_pusher_killed_mid_upload_leaves_nothing(hosts: Hosts) -> None:
    service = hosts.serve("--allow-write", "*")
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUSHER, service.location, hosts.b.socket], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"started\n"
        wait_until(lambda: len(entries(hosts.a)) == 1)  # the upload's unnamed buffer
        assert entries(hosts.a)[0]["name"] is None
        child.kill()
    finally:
        child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()
    wait_until(lambda: entries(hosts.a) == [] and not flight_devices(hosts.a) and entries(hosts.b) == [])


def _raw_put(location: str, name: str, announced: int, chunks: list[bytes], commit: bool) -> None:
    schema = pa.schema(
        [pa.field("bytes", pa.large_binary(), nullable=False)], metadata={"bufbroker.size": str(announced)}
    )
    client = fl.connect(location)
    writer, acks = client.do_put(fl.FlightDescriptor.for_path(name), schema)
    try:
        for data in chunks:
            offsets = pa.py_buffer(struct.pack("<qq", 0, len(data)))
            array = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
            writer.write_batch(pa.record_batch([array], schema=schema))
        if commit:
            writer.write_metadata(b"bufbroker.commit")
        writer.done_writing()
        acks.read()
        writer.close()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("announced", "chunks", "commit", "number"),
    [
        (8192, [b"x" * 4096, b"y" * 4096], False, errno.EPROTO),  # every byte, but no commit
        (8192, [b"x" * 4096], True, errno.EPROTO),  # a commit too early
        (4096, [b"x" * 4096, b"y"], True, errno.EMSGSIZE),  # more than announced
        (0, [], True, errno.EPROTO),  # no size
        (1 << 40, [b"x"], True, errno.EINVAL),  # more than the broker allows in one buffer
    ],
)
def test_an_incomplete_push_names_nothing(
    hosts: Hosts, announced: int, chunks: list[bytes], commit: bool, number: int
) -> None:
    service = hosts.serve("--allow-write", "*")
    with pytest.raises(pa.ArrowException) as caught:
        _raw_put(service.location, "up", announced, chunks, commit)
    assert bf._wire.translate(caught.value).errno == number
    wait_until(lambda: entries(hosts.a) == [] and not flight_devices(hosts.a))


def test_transfers_beyond_the_limit_are_refused_until_one_ends(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "*", "--max-transfers", "1")
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "frame", pattern(64 * MiB))
        client = fl.connect(service.location)
        reader = client.do_get(fl.Ticket(b"frame"))
        reader.read_chunk()
        with pytest.raises(bufbroker.BrokerError) as caught:
            bf.fetch(service.location, "frame", device=b)
        assert caught.value.errno == errno.EAGAIN
        assert b.buffers() == []
        reader.cancel()
        client.close()
        wait_until(lambda: idle(hosts.a, "frame"))
        bf.fetch(service.location, "frame", device=b).close()


def test_received_buffers_are_held_until_dropped_or_the_service_stops(hosts: Hosts) -> None:
    service = hosts.serve("--allow-write", "up-*")
    with hosts.b.connect("encoder") as b:
        source = publish(b, "local", pattern(MiB))
        ids = [bf.push(service.location, source, name=f"up-{i}") for i in range(2)]
        assert [(e["id"], e["name"], e["handles"]) for e in entries(hosts.a)] == [
            (ids[0], "up-0", 1),
            (ids[1], "up-1", 1),
        ]
        bf.drop(service.location, "up-0")
        wait_until(lambda: [e["name"] for e in entries(hosts.a)] == ["up-1"])
        with pytest.raises(bufbroker.BrokerError) as caught:
            bf.drop(service.location, "up-0")
        assert caught.value.errno == errno.ENOENT
        assert service.stop() == 0
        wait_until(lambda: entries(hosts.a) == [])
        assert json.dumps(entries(hosts.b))  # the pushing side still has its own buffer


def test_the_service_stops_with_a_stalled_client_and_releases_it(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "*", "--grace", "1")
    with hosts.a.connect("camera") as a:
        publish(a, "frame", pattern(64 * MiB))
        client = fl.connect(service.location)
        reader = client.do_get(fl.Ticket(b"frame"))
        reader.read_chunk()  # and reads no more: gRPC's shutdown alone would wait for ever
        assert service.stop() == 0
        wait_until(lambda: idle(hosts.a, "frame"))
        client.close()


def test_a_name_pushed_again_after_a_local_rename_lets_the_old_buffer_go(hosts: Hosts) -> None:
    service = hosts.serve("--allow-write", "up")
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = publish(b, "local", pattern(PAGE))
        bf.push(service.location, source, name="up")
        a.open("up").set_name("moved")  # our handle, and the service's
        assert entry(hosts.a, "moved")["handles"] == 2
        bf.push(service.location, source, name="up")
        wait_until(lambda: entry(hosts.a, "moved")["handles"] == 1 and entry(hosts.a, "up")["handles"] == 1)
