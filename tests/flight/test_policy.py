"""Nothing is served or accepted unless allowed; tokens and TLS as Flight provides them."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.flight as fl
import pytest

import bufbroker
import bufbroker.flight as bf

from flight_fixtures import PAGE, Hosts, contents, entries, hosts, idle, pattern, publish, wait_until

__all__ = ["hosts"]


def _errno(call: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(bufbroker.BrokerError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.errno or 0


def test_a_service_with_no_allow_exposes_nothing(hosts: Hosts) -> None:
    service = hosts.serve()
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = publish(a, "frame", pattern(PAGE))
        assert list(fl.connect(service.location).list_flights()) == []
        assert _errno(bf.fetch, service.location, "frame", device=b) == errno.EACCES
        assert _errno(bf.push, service.location, source, name="other") == errno.EACCES
        with pytest.raises(fl.FlightUnauthorizedError):
            fl.connect(service.location).get_flight_info(fl.FlightDescriptor.for_path("frame"))
        assert b.buffers() == []
        assert [e["name"] for e in entries(hosts.a)] == ["frame"]
        wait_until(lambda: idle(hosts.a, "frame"))


def test_globs_decide_and_leak_no_names(hosts: Hosts) -> None:
    service = hosts.serve("--allow-read", "frame-?", "--allow-write", "up-*", "--allow", "both")
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "frame-1", pattern(PAGE))
        publish(a, "frame-10", pattern(PAGE))
        bf.fetch(service.location, "frame-1", device=b).close()
        # A name outside the globs is refused the same way whether or not it exists.
        with pytest.raises(bufbroker.BrokerError) as present:
            bf.fetch(service.location, "frame-10", device=b)
        with pytest.raises(bufbroker.BrokerError) as absent:
            bf.fetch(service.location, "frame-11", device=b)
        assert present.value.errno == absent.value.errno == errno.EACCES
        assert str(present.value).replace("10", "11") == str(absent.value)
        # Inside the globs, a missing buffer is ENOENT.
        assert _errno(bf.fetch, service.location, "frame-2", device=b) == errno.ENOENT
        # Reading is not writing, and writing is not reading.
        local = publish(b, "local", pattern(PAGE))
        assert _errno(bf.push, service.location, local, name="frame-3") == errno.EACCES
        bf.push(service.location, local, name="up-1")
        assert _errno(bf.fetch, service.location, "up-1", device=b) == errno.EACCES
        assert _errno(bf.drop, service.location, "frame-1") == errno.EACCES
        # --allow gives both.
        bf.push(service.location, local, name="both")
        bf.fetch(service.location, "both", device=b).close()
        assert [e["name"] for e in b.buffers()] == ["local"]


def test_a_push_never_replaces_a_name(hosts: Hosts) -> None:
    service = hosts.serve("--allow-write", "*")
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "taken", b"mine" * 1024)
        local = publish(b, "local", pattern(PAGE))
        assert _errno(bf.push, service.location, local, name="taken") == errno.EEXIST
        with a.open("taken").cpu_access() as memory:  # a second handle, ours
            assert bytes(memory[:4]) == b"mine"
        wait_until(lambda: idle(hosts.a, "taken", handles=2) and len(entries(hosts.a)) == 1)


def test_names_are_checked(hosts: Hosts) -> None:
    service = hosts.serve("--allow", "*", "--allow-write", "*")
    with hosts.b.connect("encoder") as b:
        assert _errno(bf.fetch, service.location, "n" * 32, device=b) == errno.EINVAL
        assert _errno(bf.fetch, "http://127.0.0.1:1", "frame", device=b) == errno.EINVAL
        assert _errno(bf.fetch, "grpc://127.0.0.1:1", "frame", device=b) == errno.ECONNREFUSED  # nobody there
        assert b.buffers() == []
        for ticket in (b"n" * 32, b"\xff", b""):
            with pytest.raises(fl.FlightServerError) as caught:
                fl.connect(service.location).do_get(fl.Ticket(ticket)).read_all()
            assert bf._wire.translate(caught.value).errno == errno.EINVAL
        descriptor = fl.FlightDescriptor.for_path("a", "b")
        with pytest.raises(fl.FlightServerError) as caught:
            fl.connect(service.location).get_flight_info(descriptor)
        assert bf._wire.translate(caught.value).errno == errno.EINVAL


def test_a_token_is_required_when_configured(hosts: Hosts, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    service = hosts.serve("--allow", "*", "--allow-write", "up", "--token-file", str(token_file))
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        source = publish(a, "frame", pattern(PAGE))
        assert _errno(bf.fetch, service.location, "frame", device=b) == errno.EPERM
        assert _errno(bf.fetch, service.location, "frame", device=b, token="wrong") == errno.EPERM
        assert _errno(bf.push, service.location, source, name="up") == errno.EPERM
        with pytest.raises(fl.FlightUnauthenticatedError):
            list(fl.connect(service.location).list_flights())
        assert b.buffers() == [] and entries(hosts.a)[0]["name"] == "frame" and len(entries(hosts.a)) == 1
        fetched = bf.fetch(service.location, "frame", device=b, token="s3cret-token")
        bf.push(service.location, fetched, name="up", token="s3cret-token")
        bf.drop(service.location, "up", token="s3cret-token")
        wait_until(lambda: idle(hosts.a, "frame") and len(entries(hosts.a)) == 1)


def test_tls(hosts: Hosts, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    service = hosts.serve("--allow", "*", "--tls-cert", str(cert), "--tls-key", str(key), scheme="grpc+tls")
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "frame", pattern(3 * PAGE))
        fetched = bf.fetch(service.location, "frame", device=b, tls_root_certs=cert.read_bytes())
        assert fetched.size == 3 * PAGE
        # A client that does not trust the certificate gets nothing.
        plain = service.location.replace("grpc+tls://", "grpc://")
        assert _errno(bf.fetch, plain, "frame", device=b, timeout=5) != 0
        wait_until(lambda: idle(hosts.a, "frame"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "http://127.0.0.1:0"],
        ["--listen", "grpc+tls://127.0.0.1:0"],
        ["--listen", "grpc://127.0.0.1:0", "--tls-cert", "x.pem"],
        ["--listen", "grpc://127.0.0.1:0", "--token-file", "/nonexistent/token"],
    ],
)
def test_a_bad_command_line_is_one_line(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bufbroker.flight", *argv], capture_output=True, text=True, timeout=60
    )
    assert (
        done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("bufbroker-flight: ")
    )


def test_the_service_reaches_only_its_own_uids_names(hosts: Hosts, other_uid: int) -> None:
    """A service run as another user neither lists nor serves root's buffers, whatever it allows."""
    service = hosts.serve("--allow", "*", "--allow-write", "*", user=other_uid)
    with hosts.a.connect("camera") as a, hosts.b.connect("encoder") as b:
        publish(a, "roots", pattern(PAGE))
        assert list(fl.connect(service.location).list_flights()) == []
        assert _errno(bf.fetch, service.location, "roots", device=b) == errno.ENOENT
        # What it receives is its own uid's, charged to that uid, and it serves that back.
        local = publish(b, "local", pattern(2 * PAGE, seed=5))
        bf.push(service.location, local, name="theirs")
        assert [(e["name"], e["owner"]) for e in entries(hosts.a) if e["name"] == "theirs"] == [
            ("theirs", other_uid)
        ]
        assert [i.descriptor.path[0] for i in fl.connect(service.location).list_flights()] == [b"theirs"]
        assert contents(bf.fetch(service.location, "theirs", device=b)) == contents(local)


def test_the_client_side_of_bufbroker_never_imports_pyarrow() -> None:
    code = (
        "import sys, bufbroker, bufbroker.cli._main; bufbroker.connect; assert 'pyarrow' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
