"""The broker's limits: one dataclass, whose fields are both the config keys and the flags.

Each field ``max_foo`` is the TOML key ``max_foo`` and the ``bufbrokerd --max-foo`` flag; sizes
accept IEC suffixes (``64M``, ``4G``). docs/LIMITS.md explains each default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..protocol import MAX_REPLY_BYTES

__all__ = ["MAX_LAYOUT_SEGMENTS", "Config", "add_arguments", "from_arguments", "load_toml", "parse_size"]

# A segment packs into at most 20 bytes ([fd, offset, length]: a header and two 64-bit ints);
# a map reply carries every segment and a little more within MAX_REPLY_BYTES.
MAX_LAYOUT_SEGMENTS = (MAX_REPLY_BYTES - 1024) // 20

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"64M"`` → 67108864; plain integers pass through."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 2G)")
    return int(match[1]) * _UNITS[match[2].lower()]


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help, "size": True})


def _count(default: int | float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Every limit the broker enforces, with its default."""

    max_message_size: int = _size(64 << 10, "largest request, in bytes (EMSGSIZE beyond)")
    max_fds_per_message: int = _count(16, "descriptors one message may carry (ETOOMANYREFS beyond)")
    max_pending_requests: int = _count(128, "requests in flight per connection (EAGAIN beyond)")
    max_connections_per_uid: int = _count(256, "connections one uid may hold (ECONNREFUSED beyond)")
    max_incomplete_connections: int = _count(
        256, "connections of all non-root uids together that have not said hello yet (EAGAIN beyond)"
    )
    max_incomplete_connections_per_uid: int = _count(
        8, "connections one uid may have that have not said hello yet (EAGAIN beyond)"
    )
    max_buffers_per_uid: int = _count(4096, "live buffers one uid may own (EDQUOT beyond)")
    max_bytes_per_uid: int = _size(
        _physical_memory() // 4, "bytes of buffers one uid may own (EDQUOT beyond)"
    )
    max_handles_per_uid: int = _count(4096, "live handles minted for one uid (EDQUOT beyond)")
    max_waiting_opens_per_uid: int = _count(256, "opens one uid may have waiting for a name (EDQUOT beyond)")
    max_layout_segments: int = _count(
        2048, f"segments in one layout, at most {MAX_LAYOUT_SEGMENTS} (EMSGSIZE at attach beyond)"
    )
    fd_reserve: int = _count(256, "descriptors kept for root: other uids get EMFILE when only these are left")
    max_attachments_per_device: int = _count(1024, "attachments one device may hold at once (EDQUOT beyond)")
    max_buffer_size: int = _size(4 << 30, "largest single buffer (EINVAL beyond)")
    max_memory: int = _size(_physical_memory() // 2, "bytes of all buffers together (ENOMEM beyond)")
    handshake_timeout: float = _count(30.0, "seconds a new connection has to send hello")
    max_timelines_per_uid: int = _count(256, "live timelines one uid may own (EDQUOT beyond)")
    max_fences_per_uid: int = _count(1024, "live fences one uid may have made (EDQUOT beyond)")
    max_fences_per_buffer: int = _count(64, "points in one buffer's reservation (EDQUOT beyond)")
    max_fence_time: float = _count(10.0, "seconds a promised point may stay unsignalled (ETIMEDOUT)")
    exporter_call_timeout: float = _count(
        5.0, "seconds an exporter has to answer a call (the importer gets ETIMEDOUT)"
    )
    max_exporter_calls: int = _count(64, "calls one exporter may leave unanswered at once (EAGAIN beyond)")
    max_queued_events: int = _count(
        1024, "events and notices queued for a device that does not read them (it is disconnected beyond)"
    )
    max_streams_per_uid: int = _count(64, "streams one uid may publish at once (EDQUOT beyond)")
    max_subscribers_per_stream: int = _count(16, "subscribers of one stream at once (EUSERS beyond)")
    max_subscriptions_per_uid: int = _count(256, "subscriptions one uid may hold at once (EDQUOT beyond)")
    shm_adopted_hold: float = _count(
        60.0, "seconds the broker holds the shm buffers it adopted at start, for their users to open"
    )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive")
        if self.max_layout_segments > MAX_LAYOUT_SEGMENTS:
            raise ValueError(
                f"max_layout_segments must be at most {MAX_LAYOUT_SEGMENTS}: one reply carries them"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per limit, named after its config key."""
    group = parser.add_argument_group("limits (also config keys of the same name, with _)")
    for f in dataclasses.fields(Config):
        kind = parse_size if f.metadata.get("size") else type(f.default)
        group.add_argument(
            _flag(f.name),
            dest=f.name,
            type=kind,
            default=None,
            metavar="N",
            help=f"{f.metadata['help']} [default: {f.default}]",
        )


def _value(key: str, spec: dataclasses.Field[Any], value: Any) -> Any:
    """A config file's value for ``key``, checked as its flag would check it (ValueError)."""
    if spec.metadata.get("size"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f'{key} must be a size (4096, "64M", "2G"), not {value!r}')
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    if isinstance(spec.default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number of seconds, not {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number, not {value!r}")
    return value


def load_toml(path: Path) -> dict[str, Any]:
    """The limit keys of a TOML config file; unknown keys are an error, not a silent typo.

    Every error is one ValueError naming the file (and the key), for one line in the log.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    known = {f.name: f for f in dataclasses.fields(Config)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(known)})")
        try:
            out[key] = _value(key, known[key], value)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if out[key] <= 0:
            raise ValueError(f"{path}: {key} must be positive, not {value!r}")
    return out


def from_arguments(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    """Defaults, then the config file's keys, then the flags given on the command line."""
    values = dict(base or {})
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return Config(**values)
