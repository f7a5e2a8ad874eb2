"""The four message kinds and their encoding: bytes + fds in, validated messages out.

Theory of operation: the transport is SOCK_SEQPACKET, so the kernel keeps message boundaries
and one ``recvmsg`` yields exactly one message and its descriptors. There is therefore no
stream buffering here (unlike h11): a packet is decoded whole or rejected whole. A packet is
one msgpack array::

    [0, id, op, args]                       request (client → broker)
    [1, id, result]                         reply
    [2, id, {errno, code, message}]         error (id is nil when no request is to blame)
    [3, name, args]                         event (broker → client, unsolicited)
    [4, id, op, args]                       call (broker → exporter; id nil: a notice, unanswered)
    [5, id, result]                         answer (exporter → broker)
    [6, id, {errno, code, message}]         refusal (exporter → broker)

The last three pass only between the broker and a device that registered as an exporter at
hello (``_calls``), so a client that did not is never sent one.

Decoding never trusts the peer: the unpacker's limits are explicit, and anything that is not
one of these shapes is a ``ProtocolError`` (EPROTO), after which the connection is closed.
A well-formed request whose arguments break the op's schema is a ``RequestError`` carrying
the request id, so that it can be answered and the connection kept.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence

import msgpack

from ._calls import parse_call
from ._errors import BrokerError, ProtocolError, errno_code, errno_from_code
from ._ops import MAX_FENCE_TIMELINES, OP_NAMES, OpArgs, parse_args
from ._record import Record

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "PROTOCOL_VERSION",
    "Answer",
    "Call",
    "Error",
    "Event",
    "Message",
    "Refusal",
    "Reply",
    "Request",
    "RequestError",
    "decode",
    "decode_answer",
    "encode",
    "encode_reply",
    "encode_request",
    "packed_size",
    "peek_request_id",
]

PROTOCOL_VERSION = 1

MAX_REPLY_BYTES = 64 << 10
"""The largest packet the broker ever sends: a client's receive buffer of this size never truncates."""
MAX_REPLY_FDS = 1 + 2 * MAX_FENCE_TIMELINES
"""The most descriptors one packet from the broker carries (33): a fence, and the page and
eventfd of each of its timelines; a stream's replies carry up to 32, most replies one or none."""

REQUEST, REPLY, ERROR, EVENT, CALL, ANSWER, REFUSAL = 0, 1, 2, 3, 4, 5, 6


class Request(Record, kw_only=False):
    id: int
    op: str
    args: OpArgs
    fds: Sequence[int] = ()


class Reply(Record, kw_only=False):
    id: int
    result: Any = {}  # noqa: RUF012 (messages are values: never mutated)
    fds: Sequence[int] = ()


class Error(Record, kw_only=False):
    id: int | None
    errno: int
    message: str
    fds: Sequence[int] = ()

    @classmethod
    def from_exception(cls, id: int | None, exc: BrokerError) -> Error:
        return cls(id=id, errno=exc.errno or errno.EIO, message=exc.strerror or "")

    def exception(self) -> BrokerError:
        """The exception a client raises for this error."""
        if self.errno == errno.EPROTO:
            return ProtocolError(self.message)
        return BrokerError(self.errno, self.message)


class Event(Record, kw_only=False):
    name: str
    args: dict[str, Any] = {}  # noqa: RUF012 (messages are values: never mutated)
    fds: Sequence[int] = ()


class Call(Record, kw_only=False):
    """The broker asks an exporter (``id`` set) or tells it (``id`` None: a notice)."""

    id: int | None
    op: str
    args: OpArgs
    fds: Sequence[int] = ()  # never any: calls carry none (kept for a uniform close)


class Answer(Record, kw_only=False):
    id: int
    result: Any = {}  # noqa: RUF012 (messages are values: never mutated)
    fds: Sequence[int] = ()


class Refusal(Record, kw_only=False):
    """An exporter's error for call ``id``; its errno reaches the importer."""

    id: int
    errno: int
    message: str
    fds: Sequence[int] = ()

    def exception(self) -> BrokerError:
        return BrokerError(self.errno, self.message)


Message = Request | Reply | Error | Event | Call | Answer | Refusal


class RequestError(BrokerError):
    """A well-framed request that cannot be carried out as sent: answer it, keep the peer."""

    def __init__(self, id: int, cause: BrokerError) -> None:
        super().__init__(cause.errno or errno.EINVAL, cause.strerror)
        self.id = id

    def __reduce__(self) -> tuple[type[RequestError], tuple[int, BrokerError]]:  # type: ignore[override]
        return type(self), (self.id, BrokerError(self.errno or errno.EINVAL, self.strerror))


_local = threading.local()


def _pack(body: list[Any]) -> bytes:
    """msgpack bytes of ``body``, from a Packer kept per thread.

    ``msgpack.packb`` builds a Packer on every call, which costs three times the packing of a
    small message; a Packer is not thread-safe, hence one per thread.
    """
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(body)  # type: ignore[no-any-return]


def packed_size(value: Any) -> int:
    """How many bytes ``value`` takes inside a message (to fill a listing page to a budget)."""
    return len(_pack(value))


def encode(message: Message) -> bytes:
    """The packet for ``message``; its ``fds`` travel beside it (see ``ancillary``)."""
    match message:
        case Request(id=id, op=op, args=args):
            body: list[Any] = [REQUEST, id, op, args.to_wire()]
        case Reply(id=id, result=result):
            body = [REPLY, id, result]
        case Error(id=id, errno=number, message=text):
            body = [ERROR, id, {"errno": number, "code": errno_code(number), "message": text}]
        case Event(name=name, args=args):
            body = [EVENT, name, args]
        case Call(id=id, op=op, args=args):
            body = [CALL, id, op, args.to_wire()]
        case Answer(id=id, result=result):
            body = [ANSWER, id, result]
        case Refusal(id=id, errno=number, message=text):
            body = [REFUSAL, id, {"errno": number, "code": errno_code(number), "message": text}]
    return _pack(body)


def encode_request(id: int, args: OpArgs) -> bytes:
    """``encode(Request(...))`` without building the Request: the client's per-call path."""
    return _pack([REQUEST, id, OP_NAMES[type(args)], args.to_wire()])


def encode_reply(id: int, result: Any) -> bytes:
    """``encode(Reply(...))`` without building the Reply: the broker's per-request path."""
    return _pack([REPLY, id, result])


def _unpack(data: bytes | memoryview, max_items: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_ext_len=0,
            max_str_len=len(data),
            max_bin_len=len(data),
            max_array_len=max_items,
            max_map_len=max_items,
        )
    except Exception as e:  # msgpack raises a zoo: ValueError, ExtraData, StackError, TypeError...
        raise ProtocolError(f"not a msgpack message: {e}") from None


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value < (1 << 63)


def decode(data: bytes | memoryview, fds: Sequence[int] = (), *, max_items: int = 1 << 20) -> Message:
    """One packet (and the fds that came with it) as a message.

    The caller keeps ownership of ``fds`` on every path: on an exception nothing here has
    closed them, and a request that uses fewer than it got leaves the rest for the caller.
    (Plain checks rather than ``match`` with sequence patterns, which cost a microsecond a
    packet on this path.)
    """
    body = _unpack(data, max_items)
    if type(body) is not list or len(body) < 3:
        raise ProtocolError("a message is an array of a kind (0-3) and 2 or 3 fields")
    kind = body[0]
    if kind == REQUEST and len(body) == 4:
        id, op, args = body[1], body[2], body[3]
        if _is_id(id) and type(op) is str and type(args) is dict:
            try:
                parsed = parse_args(op, args, len(fds))
            except BrokerError as e:
                raise RequestError(id, e) from None
            return Request(id, op, parsed, fds)
    elif kind == REPLY and len(body) == 3 and _is_id(body[1]):
        return Reply(body[1], body[2], fds)
    elif kind in (ERROR, REFUSAL) and len(body) == 3 and (body[1] is None or _is_id(body[1])):
        detail = body[2]
        if (
            type(detail) is dict
            and type(number := detail.get("errno")) is int
            and type(code := detail.get("code")) is str
            and type(text := detail.get("message")) is str
        ):
            if kind == ERROR:
                return Error(id=body[1], errno=errno_from_code(code, number), message=text, fds=fds)
            if body[1] is not None and 0 < number < 4096:  # an exporter may only refuse a call it got
                return Refusal(id=body[1], errno=errno_from_code(code, number), message=text[:256], fds=fds)
    elif kind == EVENT and len(body) == 3 and type(body[1]) is str and type(body[2]) is dict:
        return Event(name=body[1], args=body[2], fds=fds)
    elif kind == CALL and len(body) == 4 and (body[1] is None or _is_id(body[1])) and type(body[2]) is str:
        try:
            return Call(body[1], body[2], parse_call(body[2], body[3]))
        except BrokerError as e:
            raise ProtocolError(f"malformed call: {e.strerror}") from None
    elif kind == ANSWER and len(body) == 3 and _is_id(body[1]):
        return Answer(body[1], body[2], fds)
    raise ProtocolError(f"malformed message of kind {kind!r}")


def decode_answer(data: bytes | memoryview, fds: Sequence[int], id: int) -> tuple[Any, Message | None]:
    """``decode`` for a client waiting on request ``id``: ``(result, None)`` if the packet is
    its reply, else ``(None, message)``.

    The reply is the packet a blocking call gets almost every time; it costs one unpacking
    and no Reply object. Anything else (an error, an event, a stray reply) is decoded whole,
    which unpacks it a second time on a path that is rarely taken.
    """
    body = _unpack(data, len(data))
    if type(body) is list and len(body) == 3 and body[0] == REPLY and type(body[1]) is int and body[1] == id:
        return body[2], None
    return None, decode(data, fds)


def peek_request_id(data: bytes | memoryview) -> int | None:
    """The id of a request that cannot be decoded whole (it was truncated), if one can be read.

    Lets the broker answer an oversized request by its id instead of only hanging up.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) or 1, max_array_len=4)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() >= 2 and unpacker.unpack() == REQUEST:
            id = unpacker.unpack()
            return id if _is_id(id) else None
    except Exception:  # anything short of a readable id means "unknown"
        pass
    return None
