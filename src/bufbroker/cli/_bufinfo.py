"""The kernel's ``/sys/kernel/debug/dma_buf/bufinfo`` text, written and read back.

Theory of operation: the text is what dma_buf_debug_show() in drivers/dma-buf/dma-buf.c writes,
byte for byte, using its own printf formats, so that people and scripts that read the kernel's
file read ours. Per buffer the kernel prints::

    "%08zu\t%08x\t%08x\t%08ld\t%s\t%08lu\t%s\n"   size, f_flags, f_mode, file_count, exp_name, ino, name
    dma_resv_describe() lines: "\t%s fence:" usage, then dma_fence_describe()'s
        "%s %s seq %llu %ssignalled\n"  driver ("bufbroker"), timeline name, point, "" or "un"
    "\tAttached Devices:\n", then "\t%s\n" per attachment (dev_name), then
    "Total %d devices attached\n\n"

between a two-line header and a final ``"\nTotal %d objects, %zu bytes\n"``. Where a kernel
field has no bufbroker meaning we print what a 6.x kernel prints for a dma-buf exported
O_RDWR|O_CLOEXEC: ``flags`` 00000002 (dma_buf_getfile() keeps only O_ACCMODE|O_NONBLOCK of the
export flags, so O_CLOEXEC never shows) and ``mode`` 02080007, the f_mode seen in 6.x kernels'
bufinfo (FMODE_READ|FMODE_WRITE in the low bits; the others are kernel-internal and move between
versions, so no reader should rely on them). ``count`` is the buffer's references
(live handles plus device holds, as file_count() counts fds plus dma_buf_get()s), ``exp_name`` the
exporting device's name, ``ino`` the buffer id (the kernel's inode numbers are also a counter).

The parser reads ours and the kernel's, including older kernels whose lines lack ``name`` (before
5.10) or ``ino`` (before 5.4), and skips fence lines.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing costs start-up time at run time
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DRIVER", "FLAGS", "MODE", "parse_bufinfo", "render_bufinfo"]

FLAGS = 0o2  # O_RDWR
DRIVER = "bufbroker"  # dma_fence_ops.get_driver_name of every fence
MODE = 0x02080007

# exp_name is taken up to the first tab, so a buffer name may itself hold tabs.
_ENTRY = re.compile(
    r"(?P<size>\d+)\t(?P<flags>[0-9a-f]+)\t(?P<mode>[0-9a-f]+)\t(?P<count>\d+)\t(?P<exp_name>[^\t]*)"
    r"(?:\t(?P<ino>\d+)(?:\t(?P<name>.*))?)?"
)
_ATTACHED = re.compile(r"Total (\d+) devices attached")
_TOTAL = re.compile(r"Total (\d+) objects, (\d+) bytes")


def _count(buffer: dict[str, Any]) -> int:
    return int(buffer["handles"]) + sum(int(i["count"]) for i in buffer["importers"])


def render_bufinfo(buffers: list[dict[str, Any]], *, escape: bool = False) -> str:
    """The bufinfo text for the broker's buffer entries (docs/PROTOCOL.md, "Inspection").

    ``escape``: for a terminal, client-chosen names with their control characters escaped
    (``_format.printable``); the text parsed for ``--json`` keeps them as they are.
    """
    if escape:
        from ._format import printable

        def shown(name: str) -> str:
            return printable(name)
    else:

        def shown(name: str) -> str:
            return name

    out = [
        "\nDma-buf Objects:\n",
        "%-8s\t%-8s\t%-8s\t%-8s\texp_name\t%-8s\tname\n" % ("size", "flags", "mode", "count", "ino"),
    ]
    for b in buffers:
        out.append(
            "%08d\t%08x\t%08x\t%08d\t%s\t%08d\t%s\n"
            % (
                b["size"],
                FLAGS,
                MODE,
                _count(b),
                "-" if b["exporter"]["name"] is None else shown(b["exporter"]["name"]),
                b["id"],
                "<none>" if b["name"] is None else shown(b["name"]),
            )
        )
        for f in b.get("fences", ()):
            timeline = shown(f["name"]) if f["name"] else "timeline-%d" % f["timeline"]
            out.append(
                "\t%s fence:%s %s seq %d %ssignalled\n"
                % (f["usage"], DRIVER, timeline, f["point"], "" if f["status"] else "un")
            )
        out.append("\tAttached Devices:\n")
        out.extend("\t%s\n" % shown(a["name"]) for a in b["attachments"])
        out.append("Total %d devices attached\n\n" % len(b["attachments"]))
    out.append("\nTotal %d objects, %d bytes\n" % (len(buffers), sum(b["size"] for b in buffers)))
    return "".join(out)


def parse_bufinfo(text: str) -> dict[str, Any]:
    """Read bufinfo text (ours or the kernel's) into plain data, checking its own totals.

    Returns ``{"objects": [{"size", "flags", "mode", "count", "exp_name", "ino", "name",
    "attached_devices": [str]}], "count": int, "bytes": int}``; ``name`` is None for
    ``<none>`` and ``ino``/``name`` are None where an older kernel does not print them. Raises
    ValueError when the text is not bufinfo or contradicts its own totals.
    """
    objects: list[dict[str, Any]] = []
    total: tuple[int, int] | None = None
    lines = iter(text.splitlines())
    for line in lines:
        if m := _ENTRY.fullmatch(line):
            objects.append(
                {
                    "size": int(m["size"]),
                    "flags": int(m["flags"], 16),
                    "mode": int(m["mode"], 16),
                    "count": int(m["count"]),
                    "exp_name": m["exp_name"],
                    "ino": None if m["ino"] is None else int(m["ino"]),
                    "name": None if m["name"] in (None, "<none>") else m["name"],
                    "attached_devices": [],
                }
            )
        elif line.strip() == "Attached Devices:":
            if not objects:
                raise ValueError("an 'Attached Devices:' block before any object")
            devices = objects[-1]["attached_devices"]
            for device in lines:
                if m := _ATTACHED.fullmatch(device):
                    if int(m[1]) != len(devices):
                        raise ValueError(
                            f"object {len(objects)} lists {len(devices)} attached devices but says {m[1]}"
                        )
                    break
                devices.append(device.removeprefix("\t"))
            else:
                raise ValueError("an 'Attached Devices:' block without its 'Total N devices attached'")
        elif m := _TOTAL.fullmatch(line):
            total = (int(m[1]), int(m[2]))
    if total is None:
        raise ValueError("not bufinfo: no 'Total N objects, M bytes' line")
    if total[0] != len(objects):
        raise ValueError(f"bufinfo says {total[0]} objects but lists {len(objects)}")
    if total[1] != sum(o["size"] for o in objects):
        raise ValueError(f"bufinfo says {total[1]} bytes but its objects add up to another total")
    return {"objects": objects, "count": total[0], "bytes": total[1]}
