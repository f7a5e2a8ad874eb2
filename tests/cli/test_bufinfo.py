"""The kernel's bufinfo format: ours byte for byte, and a parser that reads ours and the kernel's."""

from __future__ import annotations

from typing import Any

import pytest
from cli_fixtures import BUFFERS, MiB
from hypothesis import given
from hypothesis import strategies as st

from bufbroker.cli._bufinfo import FLAGS, MODE, parse_bufinfo, render_bufinfo

# What a 6.x kernel printed (a GPU buffer with a fence, and an unattached one).
KERNEL_6 = (
    "\nDma-buf Objects:\n"
    "size    \tflags   \tmode    \tcount   \texp_name\tino     \tname\n"
    "01048576\t00000002\t02080007\t00000004\tdrm\t00000002\t<none>\n"
    "\tkernel fence:0:0   signalled\n"
    "\tAttached Devices:\n"
    "\t0000:01:00.0\n"
    "Total 1 devices attached\n\n"
    "00004096\t00000002\t02080007\t00000002\tlinux,cma\t00000014\tweights\n"
    "\tAttached Devices:\n"
    "Total 0 devices attached\n\n"
    "\nTotal 2 objects, 1052672 bytes\n"
)

# Before 5.4 there was no ino column, and before 5.10 no name.
KERNEL_4 = (
    "\nDma-buf Objects:\n"
    "size    \tflags   \tmode    \tcount   \texp_name\n"
    "08294400\t00000000\t00000005\t00000005\tdrm\n"
    "\tExclusive fence: etnaviv 134000.gpu signalled\n"
    "\tAttached Devices:\n"
    "\tgpu-subsystem\n"
    "Total 1 devices attached\n\n"
    "\nTotal 1 objects, 8294400 bytes\n"
)


def test_a_6x_kernels_bufinfo_parses() -> None:
    info = parse_bufinfo(KERNEL_6)
    assert (info["count"], info["bytes"]) == (2, 1052672)
    gpu, cma = info["objects"]
    assert gpu == {
        "size": 1048576,
        "flags": 2,
        "mode": 0x02080007,
        "count": 4,
        "exp_name": "drm",
        "ino": 2,
        "name": None,
        "attached_devices": ["0000:01:00.0"],
    }
    assert (cma["exp_name"], cma["ino"], cma["name"], cma["attached_devices"]) == (
        "linux,cma",
        14,
        "weights",
        [],
    )


def test_an_old_kernels_bufinfo_parses_without_ino_and_name() -> None:
    (obj,) = parse_bufinfo(KERNEL_4)["objects"]
    assert (obj["size"], obj["exp_name"], obj["ino"], obj["name"]) == (8294400, "drm", None, None)
    assert obj["attached_devices"] == ["gpu-subsystem"]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("Total 1 devices attached", "Total 2 devices attached"),
        ("Total 2 objects", "Total 3 objects"),
        ("1052672 bytes", "1052673 bytes"),
        ("\nTotal 2 objects, 1052672 bytes\n", "\n"),
        ("Total 0 devices attached\n", ""),
    ],
)
def test_text_that_contradicts_itself_is_refused(before: str, after: str) -> None:
    with pytest.raises(ValueError):
        parse_bufinfo(KERNEL_6.replace(before, after))


def test_ours_is_written_with_the_kernels_formats() -> None:
    text = render_bufinfo(BUFFERS)
    assert text == (
        "\nDma-buf Objects:\n"
        "size    \tflags   \tmode    \tcount   \texp_name\tino     \tname\n"
        "03145728\t00000002\t02080007\t00000006\tcamera\t00000001\tframe-0\n"
        "\tAttached Devices:\n"
        "\tcamera\n"
        "\tencoder\n"
        "\tpreview\n"
        "Total 3 devices attached\n\n"
        "00008192\t00000002\t02080007\t00000002\tcamera\t00000002\tscratch\n"
        "\tAttached Devices:\n"
        "Total 0 devices attached\n\n"
        "00004096\t00000002\t02080007\t00000001\tencoder\t00000003\t<none>\n"
        "\tAttached Devices:\n"
        "Total 0 devices attached\n\n"
        f"\nTotal 3 objects, {3 * MiB + 8192 + 4096} bytes\n"
    )


def test_no_buffers_is_the_header_and_a_zero_total() -> None:
    assert parse_bufinfo(render_bufinfo([])) == {"objects": [], "count": 0, "bytes": 0}


_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\t\n\r\x85\u2028\u2029")
)


@st.composite
def _buffers(draw: st.DrawFn) -> list[dict[str, Any]]:
    ids = draw(st.lists(st.integers(1, 10**9), unique=True, max_size=6))
    return [
        {
            "id": i,
            "name": draw(st.none() | _text.filter(lambda s: s != "<none>")),
            "size": draw(st.integers(1, 1 << 40)),
            "exporter": {"name": draw(_text), "pid": 1, "device": 1},
            "handles": draw(st.integers(0, 50)),
            "importers": [{"count": c} for c in draw(st.lists(st.integers(1, 5), max_size=3))],
            "attachments": [
                {"name": n}
                for n in draw(st.lists(_text.filter(lambda s: not s.startswith("Total ")), max_size=3))
            ],
        }
        for i in ids
    ]


@given(_buffers())
def test_the_parser_reads_back_everything_we_write(buffers: list[dict[str, Any]]) -> None:
    info = parse_bufinfo(render_bufinfo(buffers))
    assert info["count"] == len(buffers) and info["bytes"] == sum(b["size"] for b in buffers)
    for b, o in zip(buffers, info["objects"], strict=True):
        assert (o["ino"], o["size"], o["name"], o["exp_name"]) == (
            b["id"],
            b["size"],
            b["name"],
            b["exporter"]["name"],
        )
        assert (o["flags"], o["mode"]) == (FLAGS, MODE)
        assert o["count"] == b["handles"] + sum(i["count"] for i in b["importers"])
        assert o["attached_devices"] == [a["name"] for a in b["attachments"]]
