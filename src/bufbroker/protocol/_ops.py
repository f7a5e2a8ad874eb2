"""Every operation's arguments, in one place.

Each op is a record (immutable, see ``_record``) whose fields are its arguments, registered
under its wire name with the number of descriptors it carries. ``parse_args`` is the only code
that turns a peer's ``args`` map into one of these; everything after it may trust the types.
Results are plain maps, described beside each op in docs/PROTOCOL.md.

Errors: an args map that breaks its op's schema is ``EINVAL``; an op nobody defined is
``ENOTTY`` (an unknown ioctl); an op that needs a descriptor and got none is ``EBADF``.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable

from ._errors import BrokerError
from ._record import Record
from ._types import Access, Constraints, Direction

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar

__all__ = [
    "MAX_FENCE_TIMELINES",
    "OPS",
    "OP_NAMES",
    "Allocate",
    "Attach",
    "AttachFence",
    "Buffers",
    "CpuBegin",
    "CpuEnd",
    "Detach",
    "Devices",
    "Export",
    "ExportFence",
    "ExportMemfd",
    "Heaps",
    "Hello",
    "Import",
    "ImportFence",
    "ImportTimeline",
    "MakeFence",
    "MakeTimeline",
    "Map",
    "MergeFences",
    "Move",
    "OpArgs",
    "OpSpec",
    "Open",
    "Ping",
    "Publish",
    "Ref",
    "Release",
    "ReleaseTimeline",
    "Revoke",
    "Seal",
    "SetName",
    "Share",
    "ShareTimeline",
    "Stats",
    "StreamMembers",
    "Streams",
    "Subscribe",
    "Timelines",
    "Unmap",
    "Unpublish",
    "Unsubscribe",
    "op",
    "parse_args",
]

MAX_NAME_BYTES = 31  # DMA_BUF_NAME_LEN - 1: the kernel keeps 32 bytes with the NUL
MAX_ID = (1 << 63) - 1
# A fence holds at most one point on each of this many timelines, so that the reply that
# describes one (its descriptor, and a page and an eventfd per timeline) fits one packet.
MAX_FENCE_TIMELINES = 16
_MAX_LIST = 4096


def _int(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ValueError("a non-negative integer")
    return value


def _str(value: Any) -> str:
    if type(value) is not str:
        raise ValueError("a string")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("true or false")
    return value


def _seconds(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError("a non-negative number of seconds")
    return float(value)


def _name(value: Any) -> str:
    name = _str(value)
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"at most {MAX_NAME_BYTES} bytes of UTF-8")
    return name


def _direction(value: Any) -> Direction:
    try:
        return Direction(value)
    except ValueError:
        raise ValueError("one of " + ", ".join(d.value for d in Direction)) from None


def _access(value: Any) -> Access:
    try:
        return Access(value)
    except ValueError:
        raise ValueError("one of " + ", ".join(a.value for a in Access)) from None


def _constraints(value: Any) -> Constraints:
    if type(value) is not dict:
        raise ValueError("a map")
    known = set(Constraints._fields)
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}")
    try:
        return Constraints(**{k: _int(v) for k, v in value.items()})
    except BrokerError as e:
        raise ValueError(e.strerror) from None


def _ids(value: Any) -> tuple[int, ...]:
    if type(value) is not list or len(value) > _MAX_LIST:
        raise ValueError(f"a list of at most {_MAX_LIST} ids")
    return tuple(_int(v) for v in value)


class Ref(Record, kw_only=False):
    """``{"ref": request_id}`` in place of an id: what that earlier request of the connection
    made (a buffer, an attachment), so that a chain of requests needs no round trip between them."""

    request: int

    def to_wire(self) -> dict[str, int]:
        return {"ref": self.request}


def _id_or_ref(value: Any) -> int | Ref:
    if type(value) is dict:
        if len(value) != 1 or "ref" not in value:
            raise ValueError('an id, or {"ref": request id}')
        return Ref(_int(value["ref"]))
    return _int(value)


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


# How each annotation is checked; a field's name may pick a stricter checker (names).
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "int": _int,
    "str": _str,
    "bool": _bool,
    "float | None": _optional(_seconds),
    "Direction": _direction,
    "Access": _access,
    "Constraints": _constraints,
    "str | None": _optional(_str),
    "tuple[int, ...]": _ids,
    "int | None": _optional(_int),
    "int | Ref": _id_or_ref,
}
_BY_NAME: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("name", "str"): _name,
    ("name", "str | None"): _optional(_name),
}


class OpSpec(Record, kw_only=False):
    name: str
    args: type[OpArgs]
    fds: int  # descriptors the request carries
    fields: tuple[tuple[str, Callable[[Any], Any], bool], ...]  # (key, check, required)
    reply_fds: bool  # whether its reply may carry descriptors
    defaults: OpArgs | None  # the arguments when none are sent, if that is allowed: one, shared


class OpArgs(Record):
    """Base of every op's argument record."""

    _names: ClassVar[tuple[str, ...]] = ()  # set per class by @op: the field names, looked up once
    reply_fds: ClassVar[bool] = False  # set per class by @op: a receiver without it needs no cmsg buffer

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._names:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, Direction | Access):
                value = value.value
            elif isinstance(value, Constraints | Ref):
                value = value.to_wire()
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


OPS: dict[str, OpSpec] = {}
OP_NAMES: dict[type[OpArgs], str] = {}  # the wire name of each args class
if TYPE_CHECKING:
    _A = TypeVar("_A", bound=type[OpArgs])


def op(
    name: str, *, fds: int = 0, reply_fds: bool = False, registry: dict[str, OpSpec] = OPS
) -> Callable[[_A], _A]:
    """Register an args record under ``name`` in ``registry`` (client requests unless told)."""

    def register(cls: _A) -> _A:
        fields = tuple(
            (
                key,
                _BY_NAME.get((key, kind)) or _CHECKS[kind],
                key not in cls._defaults,
            )
            for key, kind in cls._annotations.items()
        )
        defaults = None if any(required for _, _, required in fields) else cls()
        registry[name] = OpSpec(name, cls, fds, fields, reply_fds, defaults)
        cls._names = tuple(key for key, _, _ in fields)
        cls.reply_fds = reply_fds
        OP_NAMES[cls] = name
        return cls

    return register


def parse_args(name: str, args: Any, nfds: int, registry: dict[str, OpSpec] = OPS) -> OpArgs:
    """Validate a peer's ``args`` map for op ``name``; raise BrokerError with the errno to send."""
    spec = registry.get(name)
    if spec is None:
        raise BrokerError(errno.ENOTTY, f"unknown operation {name!r}")
    if type(args) is not dict:
        raise BrokerError(errno.EINVAL, f"{name}: arguments must be a map")
    values: dict[str, Any] = {}
    for key, check, required in spec.fields:
        if key in args:
            try:
                values[key] = check(args[key])
            except ValueError as e:
                raise BrokerError(errno.EINVAL, f"{name}: {key} must be {e}") from None
        elif required:
            raise BrokerError(errno.EINVAL, f"{name}: missing argument {key!r}")
    if len(values) != len(args):
        unknown = sorted(str(k) for k in args if k not in values)
        raise BrokerError(errno.EINVAL, f"{name}: unknown arguments {unknown}")
    if nfds < spec.fds:
        raise BrokerError(errno.EBADF, f"{name}: needs {spec.fds} descriptor(s), got {nfds}")
    if not values and spec.defaults is not None:
        return spec.defaults
    return spec.args(**values)


@op("hello")
class Hello(OpArgs):
    version: int
    name: str
    constraints: Constraints = Constraints()  # immutable: sharing is safe
    exporter: bool = False  # this device answers calls for the buffers it exports (_calls.py)


@op("ping")
class Ping(OpArgs):
    pass


@op("allocate", reply_fds=True)
class Allocate(OpArgs):
    size: int
    name: str | None = None
    heap: str = "memfd"
    sealable: bool = False  # the memfd keeps room for F_SEAL_FUTURE_WRITE / F_SEAL_WRITE


@op("export_memfd", fds=1, reply_fds=True)
class ExportMemfd(OpArgs):
    name: str | None = None


@op("import", fds=1)
class Import(OpArgs):
    pass


@op("open", reply_fds=True)
class Open(OpArgs):
    name: str
    timeout: float | None = None
    uid: int | None = None  # whose name: the caller's own unless root says another
    sealed: bool = False  # only once the buffer is sealed (Plasma's get)


@op("share", reply_fds=True)
class Share(OpArgs):
    buffer: int | Ref
    readonly: bool = False


@op("set_name")
class SetName(OpArgs):
    buffer: int | Ref
    name: str | None = None


@op("seal")
class Seal(OpArgs):
    buffer: int | Ref


@op("release")
class Release(OpArgs):
    buffer: int | Ref


@op("attach")
class Attach(OpArgs):
    buffer: int | Ref
    dynamic: bool = False  # told of moves (a "move" event) instead of pinning the buffer


@op("detach")
class Detach(OpArgs):
    attachment: int | Ref


@op("map", reply_fds=True)
class Map(OpArgs):
    attachment: int | Ref
    direction: Direction


@op("unmap")
class Unmap(OpArgs):
    attachment: int | Ref


@op("cpu_begin", reply_fds=True)
class CpuBegin(OpArgs):
    buffer: int | Ref
    access: Access
    timeout: float | None = None  # for the reservation's fences (ETIME); None: as long as they take


@op("cpu_end")
class CpuEnd(OpArgs):
    buffer: int | Ref
    access: Access


@op("buffers")
class Buffers(OpArgs):
    after: int = 0  # a cursor: replies are paged to stay under one packet


@op("devices")
class Devices(OpArgs):
    after: int = 0


@op("stats")
class Stats(OpArgs):
    pass


# --- timelines and fences (docs/PROTOCOL.md, "Timelines and fences") ----------------------
# A reply that hands over a fence lists its points and, for each timeline in it that is not in
# ``have`` (the timeline ids the caller already has the page of), that timeline's page and
# eventfd, in order after the fence's own descriptor.


@op("timeline", reply_fds=True)
class MakeTimeline(OpArgs):
    name: str | None = None


@op("timeline_share", reply_fds=True)
class ShareTimeline(OpArgs):
    timeline: int


@op("timeline_import", fds=1, reply_fds=True)
class ImportTimeline(OpArgs):
    pass


@op("timeline_release")
class ReleaseTimeline(OpArgs):
    timeline: int


@op("fence", reply_fds=True)
class MakeFence(OpArgs):
    timeline: int
    point: int


@op("fence_import", fds=1, reply_fds=True)
class ImportFence(OpArgs):
    have: tuple[int, ...] = ()


@op("fence_merge", fds=2, reply_fds=True)
class MergeFences(OpArgs):
    have: tuple[int, ...] = ()


@op("fence_attach", fds=1)
class AttachFence(OpArgs):
    buffer: int
    access: Access


@op("fence_export", reply_fds=True)
class ExportFence(OpArgs):
    buffer: int
    access: Access
    have: tuple[int, ...] = ()


@op("timelines")
class Timelines(OpArgs):
    after: int = 0


@op("export", reply_fds=True)
class Export(OpArgs):
    """A buffer whose memory and ops this device (an exporter) supplies."""

    size: int
    name: str | None = None


@op("revoke")
class Revoke(OpArgs):
    buffer: int


@op("move")
class Move(OpArgs):
    buffer: int
    timeout: float | None = None  # how long dynamic importers have to let go of the old memory


# --- streams (docs/PROTOCOL.md, "Streams") ------------------------------------------------
# A reply that hands over a stream carries the pool (read-write for the publisher, read-only
# for a subscriber), then the frame timeline's page and eventfd, then (subscribe) the
# subscriber's own release timeline's page and eventfd.


@op("publish", reply_fds=True)
class Publish(OpArgs):
    name: str
    size: int
    slots: int


@op("subscribe", reply_fds=True)
class Subscribe(OpArgs):
    name: str
    timeout: float | None = None  # wait this long for the stream to be published


@op("stream_members", reply_fds=True)
class StreamMembers(OpArgs):
    stream: int
    have: tuple[int, ...] = ()  # release timelines whose pages the publisher already has


@op("unpublish")
class Unpublish(OpArgs):
    stream: int


@op("unsubscribe")
class Unsubscribe(OpArgs):
    subscriber: int


@op("streams")
class Streams(OpArgs):
    after: int = 0


@op("heaps")
class Heaps(OpArgs):
    pass
