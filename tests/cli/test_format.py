"""Sizes, ages and tables as people read them; styling only where it is wanted."""

from __future__ import annotations

import io

import pytest

from bufbroker.cli._format import age, iec, styled, table


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (4096, "4.0 KiB"),
        (1536, "1.5 KiB"),
        (64 << 20, "64.0 MiB"),
        ((1 << 20) - 1, "1.0 MiB"),  # rounds up a unit, never "1024.0 KiB"
        (3 << 30, "3.0 GiB"),
        (5 << 40, "5.0 TiB"),
    ],
)
def test_sizes_are_iec_with_one_decimal(size: int, text: str) -> None:
    assert iec(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (5.9, "5s"),
        (59, "59s"),
        (60, "1m"),
        (3599, "59m"),
        (3600, "1h"),
        (7200, "2h"),
        (86400 * 4 + 5, "4d"),
        (-3, "0s"),
    ],
)
def test_ages_are_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert age(seconds) == text


def test_numbers_and_named_columns_flush_right_the_rest_left() -> None:
    text = table(("ID", "NAME", "SIZE"), [[1, "a", "4.0 KiB"], [10, "bbb", "64.0 MiB"]], right={"SIZE"})
    assert text.splitlines() == [
        "ID  NAME      SIZE",
        " 1  a      4.0 KiB",
        "10  bbb   64.0 MiB",
    ]


def test_no_legend_drops_the_header_and_its_width() -> None:
    assert table(("IDENTIFIER", "NAME"), [[1, "a"]], legend=False) == "1  a"


def test_none_is_a_dash_and_an_empty_table_is_its_header() -> None:
    assert table(("ID", "NAME"), [[1, None]]).splitlines()[1] == " 1  -"
    assert table(("ID", "NAME"), []) == "ID  NAME"


def test_bold_header_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert not styled() and "\x1b" not in table(("ID",), [[1]])

    monkeypatch.setattr("sys.stdout", _Tty())
    assert styled() and table(("ID",), [[1]]).startswith("\x1b[1mID\x1b[0m\n")

    monkeypatch.setenv("NO_COLOR", "1")
    assert not styled() and "\x1b" not in table(("ID",), [[1]])

    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: only a non-empty value opts out
    assert styled()
