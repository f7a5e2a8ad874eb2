"""The ``bufbroker`` command as a subprocess against a real bufbrokerd, in a scene of known state.

The scene: this test process is two devices, ``camera`` (exports ``frame-0``, 3 MiB, maps it
FROM_DEVICE; exports ``scratch``, 8 KiB, never mapped) and ``preview`` (imports frame-0 through a
handle and attaches without mapping). A second process (holder.py) is device ``encoder``: it
opens frame-0 by name, maps it TO_DEVICE twice, and holds ``enc-out`` (4 KiB) with RW cpu access.
"""

from __future__ import annotations

import json
import os
import pty
import pwd
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bufbroker import Buffer, Device, Direction
from bufbroker.cli._bufinfo import parse_bufinfo
from bufbroker.cli._render import BUFFER_COLUMNS, DEVICE_COLUMNS

from conftest import Broker

HOLDER = str(Path(__file__).with_name("holder.py"))
_SCRIPT = Path(sys.executable).parent / "bufbroker"
# The installed entry point when there is one (it is what people run), else the same main().
CLI = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from bufbroker.cli import main; raise SystemExit(main())"]
)
MiB = 1 << 20


@dataclass
class Scene:
    camera: Device
    frame: Buffer
    scratch: Buffer
    encoder_pid: int
    enc_out: int


def run(broker: Broker, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUFBROKER_SOCKET": broker.socket, "NO_COLOR": "1"}
    streams = kwargs or {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.run([*CLI, *args], text=True, timeout=60, env=env, **streams)  # type: ignore[call-overload, no-any-return]


def ok(broker: Broker, *args: str) -> str:
    out = run(broker, *args)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout


@pytest.fixture
def scene(broker: Broker) -> Iterator[Scene]:
    camera, preview = broker.connect("camera"), broker.connect("preview")
    frame = camera.allocate(3 * MiB, name="frame-0")
    mapping = frame.attach().map(Direction.FROM_DEVICE)
    scratch = camera.allocate(8192, name="scratch")
    handle = frame.share()
    preview.import_handle(handle).attach()
    os.close(handle)  # preview holds the buffer now; the handle itself is gone
    holder = subprocess.Popen(
        [sys.executable, HOLDER, broker.socket, "frame-0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        said = json.loads(holder.stdout.readline())
        assert said["frame"] == frame.id
        yield Scene(camera, frame, scratch, said["pid"], said["out"])
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(20) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for stream in (holder.stdin, holder.stdout):
            if stream:
                stream.close()
        mapping.unmap()
        preview.close()
        camera.close()


def test_ls(broker: Broker, scene: Scene) -> None:
    header, *lines = ok(broker, "ls").splitlines()
    assert header.split() == list(BUFFER_COLUMNS)
    rows = {line.split()[1]: line.split() for line in lines}
    me = str(os.getpid())
    # ID NAME SIZE(2 words) HEAP EXPORTER HANDLES ATTACHED MAPPED OWNER AGE
    assert rows["frame-0"][:10] == [
        str(scene.frame.id),
        "frame-0",
        "3.0",
        "MiB",
        "memfd",
        f"camera/{me}",
        "2",
        "3",
        "3",
        pwd.getpwuid(os.getuid()).pw_name,
    ]
    assert rows["scratch"][2:9] == ["8.0", "KiB", "memfd", f"camera/{me}", "1", "0", "0"]
    assert rows["enc-out"][2:9] == ["4.0", "KiB", "memfd", f"encoder/{scene.encoder_pid}", "1", "0", "0"]
    assert [line.split()[:10] for line in ok(broker, "ls", "--no-legend").splitlines()] == [
        line.split()[:10] for line in lines
    ]


def test_ls_json(broker: Broker, scene: Scene) -> None:
    rows = {r["name"]: r for r in json.loads(ok(broker, "ls", "--json"))}
    frame = rows["frame-0"]
    assert list(frame) == [c.lower() for c in BUFFER_COLUMNS]
    age = frame.pop("age")
    assert isinstance(age, float) and 0 <= age < 60
    assert frame == {
        "id": scene.frame.id,
        "name": "frame-0",
        "size": 3 * MiB,
        "heap": "memfd",
        "exporter": {
            "device": scene.camera.id,
            "name": "camera",
            "pid": os.getpid(),
            "supplies": False,
            "revoked": False,
        },
        "handles": 2,  # camera's own and the one encoder's open minted; preview's was closed
        "attached": 3,
        "mapped": 3,
        "owner": os.getuid(),
    }
    assert (rows["scratch"]["size"], rows["enc-out"]["size"]) == (8192, 4096)


def test_show(broker: Broker, scene: Scene) -> None:
    data = json.loads(ok(broker, "show", str(scene.frame.id), "--json"))
    assert data["layout"] == [{"fd": 0, "offset": 0, "length": 3 * MiB}]
    assert sorted((a["name"], a["direction"], a["map_count"]) for a in data["attachments"]) == [
        ("camera", "from_device", 1),
        ("encoder", "to_device", 2),
        ("preview", None, 0),
    ]
    assert sorted((i["name"], i["count"]) for i in data["importers"]) == [
        ("camera", 1),
        ("encoder", 1),
        ("preview", 1),
    ]
    text = ok(broker, "show", str(scene.frame.id))
    assert text.startswith(f"buffer {scene.frame.id}: frame-0\nsize: 3.0 MiB (3145728 bytes), heap memfd\n")
    assert "layout (1 segment):" in text and "cpu access: none" in text
    out = json.loads(ok(broker, "show", str(scene.enc_out), "--json"))
    assert [(c["name"], c["access"], c["count"]) for c in out["cpu_access"]] == [("encoder", "rw", 1)]
    assert "layout: not allocated yet" in ok(broker, "show", str(scene.scratch.id))
    missing = run(broker, "show", "999999")
    assert (missing.returncode, missing.stdout, missing.stderr.count("\n")) == (1, "", 1)


def test_devices(broker: Broker, scene: Scene) -> None:
    header, *lines = ok(broker, "devices").splitlines()
    assert header.split() == list(DEVICE_COLUMNS)
    assert sorted(line.split()[3] for line in lines) == ["camera", "encoder", "preview"]  # not ourselves
    rows = {r["name"]: r for r in json.loads(ok(broker, "devices", "--json"))}
    assert list(rows["camera"]) == [c.lower() for c in DEVICE_COLUMNS]
    me, them = os.getpid(), scene.encoder_pid
    got = {
        n: (r["pid"], r["buffers"], r["bytes"], r["pss"], r["attachments"], r["mappings"])
        for n, r in rows.items()
    }
    assert got == {
        # frame-0 is held by two processes: half its size each; this process counts it once.
        "camera": (me, 2, 3 * MiB + 8192, 3 * MiB // 2 + 8192, 1, 1),
        "preview": (me, 1, 0, 0, 1, 0),
        "encoder": (them, 2, 3 * MiB + 4096, 3 * MiB // 2 + 4096, 1, 2),
    }
    assert rows["camera"]["uid"] == os.getuid() and "test" in rows["camera"]["command"]
    # The id that `show` lists holders by.
    assert rows["camera"]["id"] == scene.camera.id
    holders = json.loads(ok(broker, "show", "frame-0", "--json"))["importers"]
    assert scene.camera.id in [h["device"] for h in holders]


def test_bufinfo(broker: Broker, scene: Scene) -> None:
    text = ok(broker, "bufinfo")
    assert text.startswith(
        "\nDma-buf Objects:\nsize    \tflags   \tmode    \tcount   \texp_name\tino     \tname\n"
    )
    assert f"03145728\t00000002\t02080007\t00000005\tcamera\t{scene.frame.id:08d}\tframe-0\n" in text
    info = parse_bufinfo(text)
    assert (info["count"], info["bytes"]) == (3, 3 * MiB + 8192 + 4096)
    frame = next(o for o in info["objects"] if o["ino"] == scene.frame.id)
    assert sorted(frame["attached_devices"]) == ["camera", "encoder", "preview"]
    assert json.loads(ok(broker, "bufinfo", "--json")) == info


def test_stats(broker: Broker, scene: Scene) -> None:
    stats = json.loads(ok(broker, "--json", "stats"))
    assert (stats["buffers"], stats["bytes"], stats["attachments"], stats["mappings"]) == (
        3,
        3 * MiB + 12288,
        3,
        3,
    )
    assert stats["devices"] == 4  # three in the scene and the command's own
    text = ok(broker, "stats")
    assert text.splitlines()[0].startswith(f"bufbroker {stats['version']}, pid {broker.pid}, up ")
    assert "max_buffers_per_uid=" in text


def test_top_prints_frames_when_piped(broker: Broker, scene: Scene) -> None:
    text = ok(broker, "top", "--iterations", "2", "--interval", "0.05", "--sort", "size")
    assert (
        text.count(
            "3 buffers, 3.0 MiB (3.0 MiB allocated), 4 devices, 3 attachments, 3 mappings; sorted by size"
        )
        == 2
    )
    first = text.split("\n\n")[1].splitlines()
    assert [line.split()[1] for line in first[1:]] == ["frame-0", "scratch", "enc-out"]


def test_a_terminal_gets_a_bold_header_unless_no_color(broker: Broker, scene: Scene) -> None:
    for no_color, bold in ((None, True), ("1", False)):
        leader, follower = pty.openpty()
        env = {**os.environ, "BUFBROKER_SOCKET": broker.socket}
        env.pop("NO_COLOR", None)
        if no_color:
            env["NO_COLOR"] = no_color
        proc = subprocess.run([*CLI, "ls"], stdout=follower, stderr=subprocess.PIPE, env=env, timeout=60)
        os.close(follower)
        shown = b""
        try:
            while chunk := os.read(leader, 4096):
                shown += chunk
        except OSError:  # EIO: the writer is gone and everything has been read
            pass
        finally:
            os.close(leader)
        assert proc.returncode == 0
        assert shown.startswith(b"\x1b[1mID") is bold and (b"\x1b" in shown) is bold


def test_an_unreachable_broker_is_one_line_and_status_1(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    out = subprocess.run([*CLI, "ls", "--socket", path], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.count("\n") == 1 and path in out.stderr and "bufbrokerd --socket" in out.stderr


def test_a_reader_that_goes_away_is_not_an_error_message(broker: Broker, scene: Scene) -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        out = run(broker, "ls", stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert (out.returncode, out.stderr) == (141, "")


def test_the_command_never_imports_trio(broker: Broker, scene: Scene) -> None:
    code = (
        "import sys\nfrom bufbroker.cli import main\n"
        "for command in ('ls', 'devices', 'show 1', 'bufinfo', 'stats'):\n"
        "    assert main(command.split()) == 0\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'trio'], 'trio was imported'\n"
    )
    env = {**os.environ, "BUFBROKER_SOCKET": broker.socket}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env, capture_output=True)


def test_install_units_through_the_entry_point(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "install-units", "--user", "--dest", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'bufbroker.service'}" in out.stdout and "systemctl --user" in out.stdout
    (line,) = [
        x for x in (tmp_path / "bufbroker.service").read_text().splitlines() if x.startswith("ExecStart=")
    ]
    daemon = Path(line.removeprefix("ExecStart="))
    assert daemon.is_absolute() and daemon.name == "bufbrokerd" and os.access(daemon, os.X_OK)
