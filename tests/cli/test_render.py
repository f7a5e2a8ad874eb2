"""Renderers: columns are the JSON keys upper-cased, cells their values in human units."""

from __future__ import annotations

import json

import pytest
from cli_fixtures import NOW, STATS, FakeSource

from bufbroker.cli import _render
from bufbroker.cli._commands import list_buffers, list_devices, show_buffer
from bufbroker.cli._render import (
    BUFFER_COLUMNS,
    DEVICE_COLUMNS,
    render_buffers,
    render_devices,
    render_json,
    render_show,
    render_stats,
    user_name,
)


def test_json_keys_are_the_lower_case_column_names() -> None:
    assert list(list_buffers(FakeSource())[0]) == [c.lower() for c in BUFFER_COLUMNS]
    assert list(list_devices(FakeSource())[0]) == [c.lower() for c in DEVICE_COLUMNS]


def test_ls_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_render, "_users", {0: "root", 65534: "nobody"})
    lines = render_buffers(list_buffers(FakeSource(), now=NOW)).splitlines()
    assert lines[0].split() == list(BUFFER_COLUMNS)
    assert lines[1].split() == [
        "1",
        "frame-0",
        "3.0",
        "MiB",
        "memfd",
        "camera/100",
        "2",
        "3",
        "3",
        "root",
        "2m",
    ]
    assert lines[2].split() == [
        "2",
        "scratch",
        "8.0",
        "KiB",
        "memfd",
        "camera/100",
        "1",
        "0",
        "0",
        "root",
        "2h",
    ]
    assert lines[3].split() == ["3", "-", "4.0", "KiB", "memfd", "encoder/200", "0", "0", "0", "nobody", "5s"]
    # Sizes line up on the right, like numbers.
    assert len({line.index("B  memfd") for line in lines[1:]}) == 1
    assert render_buffers([], legend=False) == ""


def test_devices_table() -> None:
    lines = render_devices(list_devices(FakeSource(), exclude=4)).splitlines()
    assert lines[0].split() == list(DEVICE_COLUMNS)
    camera = lines[1]
    assert camera.split()[:4] == ["1", "100", "0", "camera"]
    assert "python3 camera.py --fps 30" in camera  # whole command line when not on a terminal
    assert camera.split()[-8:] == ["2", "3.0", "MiB", "1.5", "MiB", "1", "1", "-"]  # CALLS: exports nothing
    assert lines[2].split()[-8:] == ["1", "0", "B", "0", "B", "1", "0", "-"]


def test_owner_names_fall_back_to_the_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_render, "_users", {})
    assert user_name(0) == "root"
    assert user_name(2**31 - 7) == str(2**31 - 7)  # no such user


def test_show_lists_every_part_with_tables_keyed_like_its_json() -> None:
    text = render_show(show_buffer(FakeSource(), 1, now=NOW))
    assert text.splitlines()[:5] == [
        "buffer 1: frame-0",
        "size: 3.0 MiB (3145728 bytes), heap memfd",
        "exporter: camera (device 1, pid 100)",
        "owner: root (uid 0), age 2m",
        "handles: 2 live",
    ]
    assert "layout (2 segments):" in text and "  FD   OFFSET   LENGTH" in text
    assert "  ID  DEVICE  NAME     PID  DIRECTION    MAP_COUNT  DYNAMIC  STALE" in text
    assert any(
        line.split() == ["3", "2", "preview", "100", "-", "0", "no", "0"] for line in text.splitlines()
    )
    assert "cpu access: none" in text
    unallocated = render_show(show_buffer(FakeSource(), 2, now=NOW))
    assert "layout: not allocated yet" in unallocated and "attachments: none" in unallocated
    assert "ACCESS" in render_show(show_buffer(FakeSource(), 3, now=NOW))


def test_stats_puts_use_beside_limits() -> None:
    lines = render_stats(STATS).splitlines()
    assert lines[0] == "bufbroker 0.1.0, pid 42, up 1h"
    assert lines[1].split() == ["WHAT", "NOW", "UID", "0", "LIMIT"]
    assert lines[2].split() == ["buffers", "3", "2", "4096", "per", "uid"]
    assert "1.0 GiB per uid, 2.0 GiB in all" in lines[3]
    assert lines[-1].startswith("limits: max_message_size=64.0 KiB, max_fds_per_message=16")


def test_json_is_plain_and_keeps_unicode() -> None:
    assert json.loads(render_json({"name": "café", "size": 4096})) == {"name": "café", "size": 4096}
    assert "café" in render_json(["café"])
