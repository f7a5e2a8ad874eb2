"""One connection's protocol state, sans I/O: numbering requests, encoding them, decoding what
comes back and turning errors into exceptions, and what must be undone when nobody waits for a
reply any more. The blocking and trio clients both use it; neither parses a message itself.
"""

from __future__ import annotations

import errno
import itertools
import math
import os

from .. import protocol as p
from ..protocol import BrokerError, BrokerUnavailable, Constraints

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_REPLY",
    "MAX_REPLY_FDS",
    "Session",
    "connect_error",
    "teardown_for",
    "undo_for",
]

MAX_REPLY = 256 << 10  # above any SOCK_SEQPACKET packet the kernel lets the broker send
MAX_REPLY_FDS = p.MAX_REPLY_FDS
DEFAULT_TIMEOUT = 10.0  # seconds a call waits for the broker's answer, unless told otherwise
MOVE_WAIT = 60.0  # above any exporter_call_timeout: what a move without a timeout may take
# What a cpu access without a timeout may wait for its buffer's fences, beyond the call's own
# limit: the broker's default max_fence_time, which bounds every promised point.
FENCE_ALLOWANCE = 10.0


def connect_error(path: str, error: OSError, *, default: bool) -> BrokerError:
    """What a failed connect to ``path`` means, in words that name the path.

    ``default``: the path came from the environment or the default rule, not from the caller,
    so the hint may mention how to choose another.
    """
    match error.errno:
        case errno.ENOENT | errno.ECONNREFUSED:
            if os.path.isdir(path):
                return BrokerError(errno.ENOTSOCK, f"{path} is a directory, not the broker's socket")
            return BrokerUnavailable(path, error.errno, default=default)
        case errno.EPROTOTYPE:
            return BrokerError(
                errno.EPROTOTYPE, f"{path} is not a bufbroker socket (it is not of type SOCK_SEQPACKET)"
            )
        case errno.EAGAIN:  # SO_SNDTIMEO ran out while the listener's queue stayed full
            return BrokerError(
                errno.ETIMEDOUT, f"the broker at {path} accepts no connection (it may be stopped)"
            )
    return BrokerError(error.errno or errno.EIO, f"cannot connect to {path}: {error.strerror or error}")


_NAMED = frozenset(cls for cls in p.OP_NAMES if "name" in cls._fields)  # ops that carry a name


class Session:
    """One connection's protocol state, sans I/O."""

    def __init__(
        self,
        name: str,
        constraints: Constraints | None,
        path: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        exporter: bool = False,
    ) -> None:
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise BrokerError(
                errno.EINVAL, f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        self.name = name
        self.constraints = constraints or Constraints()
        self.exporter = exporter
        self.revoked: set[int] = set()  # buffers whose exporter revoked them (the "revoked" event)
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.device_id: int | None = None
        self.broker_version: str | None = None
        self.shutting_down = False
        # The blocking client's bookkeeping of requests in flight (the trio client keeps its own
        # in its reader): ids whose caller waits, replies that came for another thread's id,
        # ids nobody waits for any more, and the requests that undo what those created.
        self.waiting: set[int] = set()
        self.parked: dict[int, p.Reply | p.Error] = {}
        self.abandoned: dict[int, p.OpArgs | None] = {}
        self.undo: list[p.OpArgs] = []

    def request(self, args: p.OpArgs) -> tuple[int, bytes]:
        """A new id and the request's packet; a request the broker must refuse is refused here.

        Names are checked locally because an oversized one would not even reach the broker
        whole; encoding errors (an int beyond 64 bits) are the caller's, not the connection's.
        """
        if type(args) in _NAMED:
            name = args.name  # type: ignore[attr-defined]
            if name is not None and (type(name) is not str or len(name.encode()) > p.MAX_NAME_BYTES):
                op = p.OP_NAMES[type(args)]
                raise BrokerError(
                    errno.EINVAL, f"{op}: name must be at most {p.MAX_NAME_BYTES} bytes of UTF-8"
                )
        id = next(self._ids)
        try:
            return id, p.encode_request(id, args)
        except (OverflowError, TypeError, ValueError) as e:
            raise BrokerError(errno.EINVAL, f"{p.OP_NAMES[type(args)]}: {e}") from None

    def wait_limit(self, args: p.OpArgs, timeout: float | None = None) -> float | None:
        """How long a call may wait for its answer: ``timeout``, else the device's, plus the
        time the broker itself was asked to wait (``open``'s and ``cpu_begin``'s timeout); None
        for ever."""
        limit = self.timeout if timeout is None else timeout
        if limit is not None and type(args) is p.Open and args.timeout:
            limit += args.timeout
        elif limit is not None and type(args) is p.Move:  # the broker waits for importers
            limit += MOVE_WAIT if args.timeout is None else args.timeout
        elif limit is not None and type(args) is p.CpuBegin:  # waits on the buffer's fences first
            limit += FENCE_ALLOWANCE if args.timeout is None else args.timeout
        return limit

    def timed_out(self, args: p.OpArgs, limit: float) -> BrokerError:
        return BrokerError(
            errno.ETIMEDOUT,
            f"{p.OP_NAMES[type(args)]}: no answer from the broker at {self.path} within {limit:g} s "
            "(is it stopped or overloaded?)",
        )

    @staticmethod
    def explain(args: p.OpArgs, error: BrokerError) -> BrokerError:
        """The broker's error, said with what the call did (an ``open`` that waited says so)."""
        if type(args) is p.Open and args.timeout and error.errno == errno.ENOENT:
            return BrokerError(
                errno.ENOENT, f"no buffer named {args.name!r} appeared within {args.timeout:g} s"
            )
        return error

    def sent_fds_error(self, args: p.OpArgs, error: OSError) -> BrokerError | None:
        """A send that failed for a reason of the caller's (a bad descriptor, a packet too
        big), as its error; None if it means the connection is gone."""
        op = p.OP_NAMES[type(args)]
        match error.errno:
            case errno.EBADF:
                return BrokerError(errno.EBADF, f"{op}: not an open file descriptor")
            case errno.EMSGSIZE:
                return BrokerError(errno.EMSGSIZE, f"{op}: the request is too large to send")
            case errno.EINVAL | errno.ETOOMANYREFS:
                return BrokerError(error.errno, f"{op}: the descriptors cannot be sent ({error.strerror})")
        return None

    def hello_args(self) -> p.Hello:
        return p.Hello(
            version=p.PROTOCOL_VERSION, name=self.name, constraints=self.constraints, exporter=self.exporter
        )

    def welcome(self, result: dict[str, Any]) -> None:
        self.device_id = result["device"]
        self.broker_version = result.get("broker")

    def receive(self, data: bytes | memoryview, fds: list[int]) -> p.Message | None:
        """Decode one packet; None for end of file. Events are noted here."""
        if not data and not fds:
            return None
        try:
            message = p.decode(data, fds)
        except BrokerError:
            p.close_all(fds)
            raise
        self._note(message)
        return message

    def answer(self, id: int, data: bytes | memoryview, fds: list[int]) -> tuple[Any, list[int]] | None:
        """What request ``id`` got, if this packet (not end of file) answers it.

        Its result and descriptors, or the exception its error stands for, raised; None for
        any other packet (an event, a reply to an abandoned request), whose descriptors are
        closed. The blocking client's per-call path: see ``p.decode_answer``.
        """
        try:
            result, message = p.decode_answer(data, fds, id)
        except BrokerError:
            p.close_all(fds)
            raise
        if message is None:
            return result, fds
        if isinstance(message, p.Event):
            self._note(message)  # which closes its descriptors
            return None
        if isinstance(message, p.Reply | p.Error) and message.id in (id, None):
            return self.outcome(message)
        if isinstance(message, p.Reply | p.Error) and message.id in self.waiting:
            self.parked[message.id] = message  # another thread's: it takes it from here
            return None
        p.close_all(message.fds)
        if isinstance(message, p.Reply | p.Error) and message.id in self.abandoned:
            self.settle_abandoned(message.id, message)
        return None

    def route(self, data: bytes | memoryview, fds: list[int]) -> p.Call | p.Event | None:
        """For a thread that reads the socket for everyone (an exporter's, see ``_threads``):
        park a reply for the thread waiting for it (or settle an abandoned one) and return
        None; return a call or event for the reader to serve. End of file is an error."""
        message = self.receive(data, fds)
        if message is None:
            raise self.lost()
        if isinstance(message, p.Call | p.Event):
            return message
        if isinstance(message, p.Reply | p.Error):
            if message.id is None:  # the broker blames no request: it is about to hang up
                p.close_all(message.fds)
                raise message.exception()
            if message.id in self.waiting:
                self.parked[message.id] = message
                return None
            if message.id in self.abandoned:
                p.close_all(message.fds)
                self.settle_abandoned(message.id, message)
                return None
        p.close_all(message.fds)
        return None

    def abandon(self, id: int, args: p.OpArgs) -> None:
        """Nobody waits for request ``id`` any more (a timeout, Ctrl-C): what its reply created
        is undone when it comes (``undo``), so the broker holds only what objects stand for."""
        self.waiting.discard(id)
        late = self.parked.pop(id, None)
        if late is None:
            self.abandoned[id] = args
            return
        p.close_all(late.fds)
        self.abandoned[id] = args
        self.settle_abandoned(id, late)

    def settle_abandoned(self, id: int, message: p.Reply | p.Error) -> None:
        args = self.abandoned.pop(id)
        if args is not None and isinstance(message, p.Reply):
            undo = undo_for(args, message.result)
            if undo is not None:
                self.undo.append(undo)

    def _note(self, message: p.Message) -> None:
        if isinstance(message, p.Event):
            p.close_all(message.fds)
            if message.name == "shutdown":
                self.shutting_down = True
            elif message.name == "revoked" and type(buffer := message.args.get("buffer")) is int:
                self.revoked.add(buffer)

    @staticmethod
    def outcome(message: p.Reply | p.Error) -> tuple[Any, list[int]]:
        """The result and descriptors of a reply, or the exception an error stands for."""
        if isinstance(message, p.Error):
            p.close_all(message.fds)
            raise message.exception()
        return message.result, list(message.fds)

    def lost(self, error: OSError | None = None) -> BrokerError:
        reason = f": {error.strerror}" if error is not None and error.strerror else ""
        at = f" at {self.path}" if self.path else ""
        return BrokerError(errno.ECONNRESET, f"the broker{at} closed the connection{reason}")


def teardown_for(buffer_ref: int | p.Ref, attachment_ref: int | p.Ref | None) -> list[p.OpArgs]:
    """What gives back a buffer mapped with it: unmap, detach, release, in that order (each
    answered with an error, and harmless, where there is nothing to give back)."""
    release: list[p.OpArgs] = [p.Release(buffer=buffer_ref)]
    if attachment_ref is None:
        return release
    return [p.Unmap(attachment=attachment_ref), p.Detach(attachment=attachment_ref), *release]


def undo_for(args: p.OpArgs, result: Any) -> p.OpArgs | None:
    """The request that takes back what ``args`` did, for a reply nobody waits for any more.

    A trio task cancelled while its request is in flight must not leak the broker-side state
    the request created; the reply's descriptors are closed by the caller.
    """
    match args:
        case p.Allocate() | p.Open() | p.Import() | p.ExportMemfd():
            return p.Release(buffer=result["id"])
        case p.Attach():
            return p.Detach(attachment=result["attachment"])
        case p.Map(attachment=att):
            return p.Unmap(attachment=att)
        case p.CpuBegin(buffer=buffer, access=access):
            return p.CpuEnd(buffer=buffer, access=access)
        case p.MakeTimeline() | p.ImportTimeline():
            return p.ReleaseTimeline(timeline=result["id"])
    return None
