"""The kernel's /sys/kernel/debug/dma_buf/bufinfo text, written and read back.

The format is dma_buf_debug_show() in drivers/dma-buf/dma-buf.c, to the byte, so that people
and scripts that read the kernel's file read ours. Where a kernel field has no bufbroker
meaning we print what the kernel prints for a dma-buf opened read-write: flags O_RDWR, mode
FMODE_READ|FMODE_WRITE; ``count`` is the buffer's references (live handles plus device holds),
``ino`` its id, ``exp_name`` its exporter's device name.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["parse_bufinfo", "render_bufinfo"]

O_RDWR = 0o2
FMODE_READ_WRITE = 0x3

_ENTRY = re.compile(r"(\d+)\t([0-9a-f]{8})\t([0-9a-f]{8})\t(\d+)\t(.*)\t(\d+)\t(.*)")


def render_bufinfo(buffers: list[dict[str, Any]]) -> str:
    out = [
        "\nDma-buf Objects:\n",
        "%-8s\t%-8s\t%-8s\t%-8s\texp_name\t%-8s\tname\n" % ("size", "flags", "mode", "count", "ino"),
    ]
    for b in buffers:
        count = b["handles"] + sum(i["count"] for i in b["importers"])
        out.append(
            "%08d\t%08x\t%08x\t%08d\t%s\t%08d\t%s\n"
            % (
                b["size"],
                O_RDWR,
                FMODE_READ_WRITE,
                count,
                b["exporter"]["name"],
                b["id"],
                b["name"] or "<none>",
            )
        )
        out.append("\tAttached Devices:\n")
        out.extend("\t%s\n" % a["name"] for a in b["attachments"])
        out.append("Total %d devices attached\n\n" % len(b["attachments"]))
    out.append("\nTotal %d objects, %d bytes\n" % (len(buffers), sum(b["size"] for b in buffers)))
    return "".join(out)


def parse_bufinfo(text: str) -> dict[str, Any]:
    """Read bufinfo text (ours or the kernel's) into ``{"objects": [...], "count", "bytes"}``."""
    objects: list[dict[str, Any]] = []
    lines = iter(text.splitlines())
    total: tuple[int, int] | None = None
    for line in lines:
        if m := _ENTRY.fullmatch(line):
            size, flags, mode, count, exp_name, ino, name = m.groups()
            current: dict[str, Any] = {
                "size": int(size),
                "flags": int(flags, 16),
                "mode": int(mode, 16),
                "count": int(count),
                "exp_name": exp_name,
                "ino": int(ino),
                "name": None if name == "<none>" else name,
                "attached_devices": [],
            }
            objects.append(current)
        elif line == "\tAttached Devices:":
            for device in lines:
                if m := re.fullmatch(r"Total (\d+) devices attached", device):
                    if int(m[1]) != len(objects[-1]["attached_devices"]):
                        raise ValueError(f"device count mismatch for ino {objects[-1]['ino']}")
                    break
                objects[-1]["attached_devices"].append(device.removeprefix("\t"))
        elif m := re.fullmatch(r"Total (\d+) objects, (\d+) bytes", line):
            total = (int(m[1]), int(m[2]))
    if total is None:
        raise ValueError("not bufinfo: no 'Total N objects, M bytes' line")
    if total[0] != len(objects):
        raise ValueError(f"bufinfo says {total[0]} objects but lists {len(objects)}")
    return {"objects": objects, "count": total[0], "bytes": total[1]}
