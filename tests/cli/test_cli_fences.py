"""``bufbroker timelines``, and each buffer's fences in ``show`` and ``bufinfo``, against a real broker."""

from __future__ import annotations

import errno
import json

from test_cli_live import ok

from bufbroker import Access
from bufbroker.cli._render import TIMELINE_COLUMNS

from conftest import Broker


def test_timelines_and_fences_as_the_commands_show_them(broker: Broker) -> None:
    with broker.connect("render") as dev, broker.connect("display") as other:
        done = dev.timeline(name="render-done")
        failed = dev.timeline(name="upload")
        handle = done.share()
        other.import_timeline(handle)
        done.signal(3)
        failed.signal(1, error=errno.EIO)
        buf = dev.allocate(4096, name="frame")
        with done.fence(5) as fence:
            buf.attach_fence(fence, Access.WRITE)
        with failed.fence(1) as fence:
            buf.attach_fence(fence, Access.READ)  # reached (failed) already: not kept

        rows = json.loads(ok(broker, "timelines", "--json"))
        assert [(r["id"], r["name"], r["value"], r["promised"], r["error"]) for r in rows] == [
            (done.id, "render-done", 3, 5, 0),
            (failed.id, "upload", 1, 0, errno.EIO),
        ]
        assert rows[0]["signaller"]["name"] == "render" and rows[0]["signaller"]["alive"]
        assert sorted(h["name"] for h in rows[0]["holders"]) == ["display", "render"]
        assert rows[0]["handles"] == 1

        text = ok(broker, "timelines").splitlines()
        assert text[0].split() == list(TIMELINE_COLUMNS)
        assert "EIO from 1" in text[2]

        bufinfo = ok(broker, "bufinfo")
        assert "\twrite fence:bufbroker render-done seq 5 unsignalled\n" in bufinfo
        assert json.loads(ok(broker, "bufinfo", "--json"))["count"] == 1  # the parser skips fence lines

        shown = ok(broker, "show", str(buf.id))
        assert "fences:" in shown and "pending" in shown
        done.signal(5)
        assert "\twrite fence:bufbroker render-done seq 5 signalled\n" in ok(broker, "bufinfo")
