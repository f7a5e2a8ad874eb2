"""Buffers cross from one broker to another through the Flight service, byte for byte."""

from __future__ import annotations

import hashlib
import threading

import pyarrow.flight as fl
import pytest

import bufbroker.flight as bf
from bufbroker.flight import CHUNK

from flight_fixtures import PAGE, Hosts, contents, entry, hosts, idle, pattern, publish, wait_until

__all__ = ["hosts"]

MiB = 1 << 20


def test_round_trip_of_1_mib(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "frame*", "--allow-write", "back*")
    data = pattern(MiB)
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "frame-0", data)
        fetched = bf.fetch(service.location, "frame-0", device=b)
        assert fetched.size == MiB and fetched.name is None
        assert contents(fetched) == data
        remote_id = bf.push(service.location, fetched, name="back-0")
        returned = a.open("back-0")
        assert returned.id == remote_id and contents(returned) == data
        wait_until(lambda: idle(hosts.a, "frame-0"))


def test_round_trip_of_256_mib(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "big", "--allow-write", "big-back")
    size = 256 * MiB
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = a.allocate(size, name="big")
        with source.cpu_access() as memory:
            block = pattern(4 * MiB, seed=3)
            for offset in range(0, size, len(block)):
                memory[offset : offset + len(block)] = block
            memory[size - 5 :] = b"tail!"
            digest = hashlib.sha256(memory[:size]).digest()
        fetched = bf.fetch(service.location, "big", device=b)
        with fetched.cpu_access() as memory:
            assert len(memory) >= size and hashlib.sha256(memory[:size]).digest() == digest
        bf.push(service.location, fetched, name="big-back")
        fetched.close()
        with a.open("big-back").cpu_access() as memory:
            assert hashlib.sha256(memory[:size]).digest() == digest
        wait_until(lambda: idle(hosts.a, "big"))


EDGES = [1, PAGE - 1, PAGE, PAGE + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + PAGE + 1]


@pytest.mark.parametrize("size", EDGES)
def test_chunk_edges(hosts: Hosts, size: int) -> None:
    """Every size around a page and a chunk arrives whole, each way, in the announced length."""
    service = hosts.serve("--allow", "edge", "--allow-write", "edge-back")
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = publish(a, "edge", pattern(size, seed=size))
        expected = contents(source)  # the buffer's own .size bytes, whatever it rounds to
        reader = fl.connect(service.location).do_get(fl.Ticket(b"edge"))
        assert reader.schema.metadata[b"bufbroker.size"] == str(source.size).encode()
        lengths = [chunk.data.column(0).buffers()[2].size for chunk in reader]
        assert sum(lengths) == source.size and max(lengths) <= CHUNK
        fetched = bf.fetch(service.location, "edge", device=b)
        assert fetched.size == source.size and contents(fetched) == expected
        bf.push(service.location, fetched, name="edge-back", chunk=PAGE)
        back = a.open("edge-back")
        assert back.size == source.size and contents(back) == expected


def test_small_chunks_of_the_service(hosts: Hosts) -> None:
    """A service sending small messages (--chunk) still lands every byte in place."""
    service = hosts.serve("--allow", "odd", "--chunk", str(PAGE + 1))
    data = pattern(5 * PAGE + 3, seed=9)
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = publish(a, "odd", data)
        seen: list[tuple[int, int]] = []
        fetched = bf.fetch(
            service.location, "odd", device=b, progress=lambda done, total: seen.append((done, total))
        )
        assert contents(fetched) == contents(source)
        assert seen[0] == (PAGE + 1, source.size) and seen[-1] == (source.size, source.size)


def test_concurrent_transfers(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "c-*", "--allow-write", "up-*")
    sources = {f"c-{i}": pattern(3 * MiB + i * PAGE + i, seed=i) for i in range(4)}
    failures: list[BaseException] = []

    def fetch_and_push(name: str, index: int) -> None:
        try:
            with hosts.b.connect(f"consumer-{index}") as b:
                fetched = bf.fetch(service.location, name, device=b)
                assert contents(fetched)[: len(sources[name])] == sources[name]
                bf.push(service.location, fetched, name=f"up-{index}")
        except BaseException as e:
            failures.append(e)

    with hosts.a.connect("camera") as a:
        for name, data in sources.items():
            publish(a, name, data)
        # Two consumers of each buffer at once: eight transfers in flight, then eight pushes.
        threads = [threading.Thread(target=fetch_and_push, args=(f"c-{i % 4}", i)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert not failures, failures
        for i in range(8):
            assert contents(a.open(f"up-{i}"))[: len(sources[f"c-{i % 4}"])] == sources[f"c-{i % 4}"]
        for name in sources:
            wait_until(lambda name=name: idle(hosts.a, name))


def test_listing_and_description(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "shown-*")
    with hosts.a.connect("camera") as a:
        publish(a, "shown-1", pattern(PAGE))
        publish(a, "shown-2", pattern(3 * PAGE))
        publish(a, "hidden", pattern(PAGE))
        a.allocate(PAGE)  # unnamed: never listed
        client = fl.connect(service.location)
        listed = {info.descriptor.path[0].decode(): info.total_bytes for info in client.list_flights()}
        assert listed == {
            "shown-1": entry(hosts.a, "shown-1")["size"],
            "shown-2": entry(hosts.a, "shown-2")["size"],
        }
        info = client.get_flight_info(fl.FlightDescriptor.for_path("shown-2"))
        assert info.total_bytes == 3 * PAGE and info.endpoints[0].ticket.ticket == b"shown-2"
        wait_until(lambda: idle(hosts.a, "shown-2"))
