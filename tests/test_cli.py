"""The bufbroker command: renderers and the bufinfo format on their own, then live as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bufbroker import Access, Direction
from bufbroker.cli._bufinfo import parse_bufinfo, render_bufinfo
from bufbroker.cli._format import age, iec, table
from bufbroker.cli._views import device_rows

from conftest import Broker

CLI = [sys.executable, "-c", "from bufbroker.cli import main; raise SystemExit(main())"]

KERNEL_SAMPLE = """
Dma-buf Objects:
size    \tflags   \tmode    \tcount   \texp_name\tino     \tname
00032768\t00000002\t00080007\t00000003\tsystem\t00000113\t<none>
\tAttached Devices:
\tfe00b000.gpu
\tfde40000.npu
Total 2 devices attached

00004096\t00000002\t00080007\t00000001\tsystem-uncached\t00000114\tframe
\tAttached Devices:
Total 0 devices attached


Total 2 objects, 36864 bytes
"""


def test_units_and_ages() -> None:
    assert [iec(n) for n in (0, 1023, 1024, 64 << 20, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "64.0 MiB",
        "3.0 GiB",
    ]
    assert [age(s) for s in (0, 59, 60, 3599, 3600, 86400 * 2)] == ["0s", "59s", "1m", "59m", "1h", "2d"]


def test_tables_align_and_can_drop_the_legend() -> None:
    text = table(("ID", "NAME"), [[1, "a"], [10, "bbb"]])
    assert text.splitlines() == ["ID  NAME", " 1  a", "10  bbb"]
    assert table(("ID", "NAME"), [[1, "a"]], legend=False) == "1  a"


def test_the_kernels_own_bufinfo_parses() -> None:
    info = parse_bufinfo(KERNEL_SAMPLE)
    assert info["count"] == 2 and info["bytes"] == 36864
    first, second = info["objects"]
    assert first["attached_devices"] == ["fe00b000.gpu", "fde40000.npu"] and first["name"] is None
    assert (second["exp_name"], second["ino"], second["name"]) == ("system-uncached", 114, "frame")
    with pytest.raises(ValueError):
        parse_bufinfo(KERNEL_SAMPLE.replace("Total 2 devices", "Total 3 devices"))


def test_bufinfo_is_written_in_the_kernels_format() -> None:
    buffer = {
        "id": 7,
        "name": None,
        "size": 8192,
        "handles": 1,
        "exporter": {"name": "cam", "pid": 1, "device": 1},
        "importers": [{"count": 2}],
        "attachments": [{"name": "gpu"}, {"name": "npu"}],
    }
    text = render_bufinfo([buffer])
    assert text.splitlines()[:4] == [
        "",
        "Dma-buf Objects:",
        "size    \tflags   \tmode    \tcount   \texp_name\tino     \tname",
        "00008192\t00000002\t00000003\t00000003\tcam\t00000007\t<none>",
    ]
    assert text.endswith("Total 2 devices attached\n\n\nTotal 1 objects, 8192 bytes\n")
    parsed = parse_bufinfo(text)["objects"][0]
    assert (parsed["ino"], parsed["count"], parsed["attached_devices"]) == (7, 3, ["gpu", "npu"])


def test_bytes_count_each_buffer_once_per_process_and_pss_shares_it() -> None:
    buffers = [{"id": 1, "size": 1200}, {"id": 2, "size": 600}]
    devices = [
        {
            "pid": 10,
            "uid": 0,
            "name": "a",
            "command": "x",
            "buffers": [1, 2],
            "attachments": 0,
            "mappings": 0,
        },
        {"pid": 10, "uid": 0, "name": "b", "command": "x", "buffers": [1], "attachments": 0, "mappings": 0},
        {"pid": 20, "uid": 0, "name": "c", "command": "y", "buffers": [1], "attachments": 0, "mappings": 0},
    ]
    rows = device_rows(devices, buffers)
    assert [(r["bytes"], r["pss"]) for r in rows] == [(1800, 1200), (0, 0), (1200, 600)]


def _run(broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BUFBROKER_SOCKET": broker.socket, "NO_COLOR": "1"},
    )


@pytest.fixture
def scene(broker: Broker):  # type: ignore[no-untyped-def]
    """Two devices in one process and one in another state: known buffers, attachments, maps."""
    camera = broker.connect("camera")
    encoder = broker.connect("encoder")
    frame = camera.allocate(3 << 20, name="frame-0")
    att = frame.attach()
    mapping = att.map(Direction.FROM_DEVICE)
    handle = frame.share()
    theirs = encoder.import_handle(handle)
    theirs_att = theirs.attach()
    theirs_map = theirs_att.map(Direction.TO_DEVICE)
    idle = camera.allocate(4096)
    access = idle.cpu_access(Access.READ)
    access.begin()
    yield {"frame": frame, "idle": idle}
    access.end()
    mapping.unmap()
    theirs_map.unmap()
    for d in (camera, encoder):
        d.close()
    os.close(handle)


def test_ls_table_and_json(broker: Broker, scene) -> None:  # type: ignore[no-untyped-def]
    out = _run(broker, "ls")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == [
        "ID",
        "NAME",
        "SIZE",
        "HEAP",
        "EXPORTER",
        "HANDLES",
        "ATTACHED",
        "MAPPED",
        "OWNER",
        "AGE",
    ]
    frame = next(r for r in rows if "frame-0" in r).split()
    assert frame[1:5] == ["frame-0", "3.0", "MiB", "memfd"] and frame[5].startswith("camera/")
    assert frame[6:9] == ["2", "2", "2"]  # own handle + shared one; two attachments; two maps
    data = json.loads(_run(broker, "ls", "--json").stdout)
    by_id = {d["id"]: d for d in data}
    f = by_id[scene["frame"].id]
    assert set(f) == {
        "id",
        "name",
        "size",
        "heap",
        "exporter",
        "handles",
        "attached",
        "mapped",
        "owner",
        "age",
    }
    assert (f["size"], f["handles"], f["attached"], f["mapped"], f["owner"]) == (
        3 << 20,
        2,
        2,
        2,
        os.getuid(),
    )
    assert by_id[scene["idle"].id]["mapped"] == 0
    assert _run(broker, "--no-legend", "ls").stdout.splitlines()[0].split()[0].isdigit()


def test_show_devices_bufinfo_and_stats(broker: Broker, scene) -> None:  # type: ignore[no-untyped-def]
    frame = scene["frame"]
    show = json.loads(_run(broker, "show", str(frame.id), "--json").stdout)
    assert sorted((a["name"], a["direction"], a["map_count"]) for a in show["attachments"]) == [
        ("camera", "from_device", 1),
        ("encoder", "to_device", 1),
    ]
    text = _run(broker, "show", str(scene["idle"].id)).stdout
    assert "cpu access:" in text and "read" in text
    assert _run(broker, "show", "999").returncode == 1

    devices = json.loads(_run(broker, "devices", "--json").stdout)
    mine = {d["name"]: d for d in devices if d["name"] in ("camera", "encoder")}
    assert mine["camera"]["bytes"] == (3 << 20) + 4096  # both buffers, once
    assert mine["encoder"]["bytes"] == 0  # the same process already counted frame-0
    assert mine["camera"]["pss"] == (3 << 20) + 4096
    assert (mine["camera"]["attachments"], mine["camera"]["mappings"]) == (1, 1)

    info = parse_bufinfo(_run(broker, "bufinfo").stdout)
    by_ino = {o["ino"]: o for o in info["objects"]}
    assert sorted(by_ino[frame.id]["attached_devices"]) == ["camera", "encoder"]
    assert by_ino[frame.id]["name"] == "frame-0" and by_ino[frame.id]["exp_name"] == "camera"
    assert info["bytes"] == (3 << 20) + 4096

    stats = json.loads(_run(broker, "stats", "--json").stdout)
    assert (stats["buffers"], stats["mappings"], stats["attachments"]) == (2, 2, 2)
    assert "max_buffers_per_uid" in _run(broker, "stats").stdout


def test_top_draws_frames(broker: Broker, scene) -> None:  # type: ignore[no-untyped-def]
    out = _run(broker, "top", "--iterations", "2", "--interval", "0.05", "--sort", "id")
    assert out.returncode == 0
    assert out.stdout.count("sorted by id") == 2 and "frame-0" in out.stdout


def test_an_unreachable_broker_is_one_line_and_status_1(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    out = subprocess.run([*CLI, "ls", "--socket", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and path in out.stderr and "bufbrokerd" in out.stderr
    assert "Traceback" not in out.stderr


def test_install_units_points_at_this_installation(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "install-units", "--user", "--dest", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    service = (tmp_path / "bufbroker.service").read_text()
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert Path(exec_start.removeprefix("ExecStart=")).is_absolute()
    assert exec_start.endswith("bufbrokerd") and "/usr/bin/" not in exec_start
    assert (tmp_path / "bufbroker.socket").exists() and "systemctl --user" in out.stdout


def test_the_cli_never_imports_trio() -> None:
    code = "import sys; from bufbroker.cli import _main; assert 'trio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
