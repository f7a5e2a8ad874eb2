"""The quick reading of a plain command line gives exactly argparse's namespace, and leaves
every other line to argparse."""

from __future__ import annotations

import pytest

from bufbroker.cli._args import _quick
from bufbroker.cli._parser import parser


@pytest.mark.parametrize(
    "argv",
    [
        ["ls"],
        ["--json", "ls"],
        ["ls", "--no-legend", "--json"],
        ["--socket", "/s", "devices"],
        ["--socket=/s", "bufinfo", "--timeout", "0.5"],
        ["stats", "--timeout=3"],
        ["show", "frame-0"],
        ["show", "--json", "12"],
        ["--no-legend", "show", "x", "--socket", "/a b"],
    ],
)
def test_the_quick_reading_is_argparses(argv: list[str]) -> None:
    quick = _quick(argv)
    assert quick is not None
    assert vars(quick) == vars(parser(argv).parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["ls", "-h"],
        ["--version"],
        ["top"],
        ["install-units", "--user"],
        ["show"],
        ["show", "a", "b"],
        ["ls", "extra"],
        ["ls", "--timeout", "0"],
        ["ls", "--timeout", "soon"],
        ["ls", "--timeout"],
        ["ls", "--socket"],
        ["ls", "--sock", "/s"],  # an abbreviation: argparse's to accept
        ["frobnicate"],
        ["show", "-3"],
    ],
)
def test_anything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert _quick(argv) is None
