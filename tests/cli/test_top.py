"""``top``: frames in each sort order, the loop's ends, and what it writes to a terminal."""

from __future__ import annotations

import io

import pytest
from cli_fixtures import FakeSource

from bufbroker.cli._top import SORT_KEYS, frame, top


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _ids(text: str) -> list[int]:
    return [int(line.split()[0]) for line in text.splitlines()[3:]]


@pytest.mark.parametrize(
    ("sort", "ids"),
    [
        ("size", [1, 2, 3]),
        ("age", [2, 1, 3]),
        ("id", [1, 2, 3]),
        ("handles", [1, 2, 3]),
        ("mapped", [1, 2, 3]),
    ],
)
def test_frames_sort(sort: str, ids: list[int]) -> None:
    text = frame(FakeSource(), sort=sort)
    assert text.splitlines()[0] == (
        "bufbroker 0.1.0 (pid 42): 3 buffers, 3.0 MiB (3.0 MiB allocated), 4 devices, "
        f"3 attachments, 3 mappings; sorted by {sort}"
    )
    assert _ids(text) == ids
    assert sort in SORT_KEYS


def test_piped_frames_follow_one_another(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    sleeps: list[float] = []
    monkeypatch.setattr("time.sleep", sleeps.append)
    source = FakeSource()
    assert top(source, sort="id", interval=0.25, iterations=3) == 0
    assert out.getvalue().count("sorted by id") == 3 and "\x1b" not in out.getvalue()
    assert sleeps == [0.25, 0.25]  # none after the last frame
    assert source.calls == 3


def test_on_a_terminal_it_redraws_in_place_and_restores_the_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Tty()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setenv("NO_COLOR", "1")  # no bold, but still drawn in place
    assert top(FakeSource(), sort="size", interval=1, iterations=2) == 0
    text = out.getvalue()
    assert text.startswith("\x1b[?1049h\x1b[?25l\x1b[H") and text.endswith("\x1b[?25h\x1b[?1049l")
    assert text.count("\x1b[H") == 2 and text.count("\x1b[J") == 2 and "\x1b[1m" not in text


def test_ctrl_c_ends_it_with_status_0_and_the_screen_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Tty()
    monkeypatch.setattr("sys.stdout", out)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", interrupt)
    assert top(FakeSource(), sort="size", interval=1, iterations=None) == 0
    assert out.getvalue().endswith("\x1b[?25h\x1b[?1049l")


def test_an_error_still_restores_the_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Tty()
    monkeypatch.setattr("sys.stdout", out)

    class Gone(FakeSource):
        def stats(self) -> dict[str, object]:
            raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        top(Gone(), sort="size", interval=1, iterations=None)
    assert out.getvalue().endswith("\x1b[?25h\x1b[?1049l")


def test_rows_beyond_the_terminal_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Tty()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("shutil.get_terminal_size", lambda: __import__("os").terminal_size((80, 5)))
    top(FakeSource(), sort="id", interval=1, iterations=1)
    drawn = out.getvalue().split("\x1b[H", 1)[1].split("\x1b[J")[0]
    assert drawn.count("\n") == 4
