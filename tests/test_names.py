"""Names: at most 31 bytes, renamed at will, opened by name (with a wait), per uid."""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable

import pytest

import bufbroker

from conftest import Broker, Peer


def test_names_and_renames(broker: Broker) -> None:
    with broker.connect() as dev:
        buf = dev.allocate(4096, name="frame-0")
        assert dev.buffers()[0]["name"] == "frame-0"
        buf.set_name("x" * 31)
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.set_name("x" * 32)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(bufbroker.BrokerError) as e:
            buf.set_name("é" * 16)  # 32 bytes of UTF-8
        assert e.value.errno == errno.EINVAL
        buf.set_name("renamed")
        assert dev.buffers()[0]["name"] == "renamed"
        with pytest.raises(bufbroker.BrokerError) as e:
            dev.allocate(4096, name="renamed")
        assert e.value.errno == errno.EEXIST
        buf.set_name(None)
        assert dev.buffers()[0]["name"] is None


def test_open_by_name(broker: Broker) -> None:
    with broker.connect("a") as a, broker.connect("b") as b:
        with pytest.raises(bufbroker.BrokerError) as e:
            b.open("missing")
        assert e.value.errno == errno.ENOENT
        buf = a.allocate(4096, name="shared")
        with buf.cpu_access(bufbroker.Access.WRITE) as mem:
            mem[:2] = b"hi"
        mine = b.open("shared")
        assert mine.id == buf.id and mine.handle is not None
        with mine.cpu_access(bufbroker.Access.READ) as mem:
            assert bytes(mem[:2]) == b"hi"


def test_open_waits_for_the_name_to_appear(broker: Broker) -> None:
    with broker.connect("waiter") as w, broker.connect("maker") as m:

        def make_later() -> None:
            time.sleep(0.3)
            m.allocate(4096).set_name("late")

        maker = threading.Thread(target=make_later)
        maker.start()
        started = time.monotonic()
        buf = w.open("late", timeout=10)
        maker.join()
        assert buf.name == "late"
        assert time.monotonic() - started < 9
        with pytest.raises(bufbroker.BrokerError) as e:
            w.open("never", timeout=0.2)
        assert e.value.errno == errno.ENOENT


def test_another_uid_cannot_open_by_name(broker: Broker, peer: Callable[..., Peer], other_uid: int) -> None:
    with broker.connect() as dev:
        dev.allocate(4096, name="private")
        stranger = peer("open_as", broker.socket, other_uid, "private")
        # Its names are its own: another uid's answers as a missing one, revealing nothing.
        assert json.loads(stranger.line()) == {"opened": False, "errno": errno.ENOENT}
        stranger.finish()
