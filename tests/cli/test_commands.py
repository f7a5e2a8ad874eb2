"""The commands' data, from a broker's answers written out by hand: no broker, no rendering."""

from __future__ import annotations

import pytest
from cli_fixtures import BUFFERS, DEVICES, NOW, FakeSource, MiB

from bufbroker.cli._commands import NoSuchBuffer, device_rows, list_buffers, list_devices, show_buffer


def test_ls_rows_count_attachments_and_their_mappings() -> None:
    rows = list_buffers(FakeSource(), now=NOW)
    assert [r["id"] for r in rows] == [1, 2, 3]
    frame = rows[0]
    assert frame == {
        "id": 1,
        "name": "frame-0",
        "size": 3 * MiB,
        "heap": "memfd",
        "exporter": {"device": 1, "name": "camera", "pid": 100, "supplies": False, "revoked": False},
        "handles": 2,
        "attached": 3,  # preview is attached but not mapped
        "mapped": 3,  # camera once, encoder twice
        "owner": 0,
        "age": 125.0,
    }
    assert (rows[1]["attached"], rows[1]["mapped"], rows[2]["name"]) == (0, 0, None)


def test_an_age_is_never_negative_when_clocks_disagree() -> None:
    assert list_buffers(FakeSource(), now=NOW - 10_000)[0]["age"] == 0.0


def test_show_is_the_row_plus_layout_holders_attachments_and_cpu_access() -> None:
    data = show_buffer(FakeSource(), 1, now=NOW)
    assert {k: data[k] for k in ("id", "attached", "mapped", "age", "created")} == {
        "id": 1,
        "attached": 3,
        "mapped": 3,
        "age": 125.0,
        "created": NOW - 125,
    }
    assert data["layout"] == [
        {"fd": 0, "offset": 0, "length": 2 * MiB},
        {"fd": 0, "offset": 2 * MiB, "length": MiB},
    ]
    assert data["attachments"] == BUFFERS[0]["attachments"]
    assert data["importers"] == BUFFERS[0]["importers"]
    assert show_buffer(FakeSource(), 2)["layout"] is None
    assert show_buffer(FakeSource(), 3)["cpu_access"][0]["access"] == "rw"


def test_show_of_an_unknown_id_says_so() -> None:
    with pytest.raises(NoSuchBuffer, match="no buffer 99"):
        show_buffer(FakeSource(), 99)


def test_bytes_count_a_buffer_once_per_process_and_pss_shares_it_between_processes() -> None:
    rows = {r["name"]: r for r in list_devices(FakeSource(), exclude=4)}
    assert set(rows) == {"camera", "preview", "encoder"}  # the command's own device is left out
    # frame-0 (3 MiB) is held by pids 100 (two devices) and 200: 1.5 MiB each.
    assert (rows["camera"]["buffers"], rows["camera"]["bytes"], rows["camera"]["pss"]) == (
        2,
        3 * MiB + 8192,
        3 * MiB // 2 + 8192,
    )
    assert (rows["preview"]["buffers"], rows["preview"]["bytes"], rows["preview"]["pss"]) == (1, 0, 0)
    assert (rows["encoder"]["bytes"], rows["encoder"]["pss"]) == (3 * MiB + 4096, 3 * MiB // 2 + 4096)
    # Summed over one pid: its memory; summed over all: all held memory, once.
    assert sum(r["pss"] for r in rows.values()) == 3 * MiB + 8192 + 4096
    assert (rows["encoder"]["attachments"], rows["encoder"]["mappings"]) == (1, 2)


def test_a_buffer_not_listed_counts_as_held_but_adds_no_bytes() -> None:
    (row,) = device_rows([{**DEVICES[0], "buffers": [1, 99, 99]}], BUFFERS)
    assert (row["buffers"], row["bytes"], row["pss"]) == (2, 3 * MiB, 3 * MiB)


def test_without_exclude_every_device_is_listed() -> None:
    assert len(list_devices(FakeSource())) == len(DEVICES)
