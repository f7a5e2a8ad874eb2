"""What crosses the wire, shared by the service and the client: no I/O here.

A buffer travels as one Arrow stream whose schema has a single ``large_binary`` column and
carries the byte length and the name in its metadata. Each record batch is one row holding the
next chunk of the bytes, so that the sender can wrap its mapping in Arrow buffers without a
copy (a ``large_binary`` array is an offsets buffer and a data buffer, and the data buffer may be
any slice of memory). Errors cross as Flight errors whose ``extra_info`` holds the errno's
symbolic name, so that the client raises the ``BrokerError`` the service saw.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as fl

from ..protocol import BrokerError, errno_code, errno_from_code

__all__ = [
    "CHUNK",
    "COMMIT",
    "MAX_NAME",
    "batches",
    "chunk_bytes",
    "name_from",
    "refusal",
    "schema_for",
    "size_of",
    "translate",
]

CHUNK = 4 << 20  # bytes per record batch: large enough to amortise a message, small for memory
MAX_NAME = 31  # DMA_BUF_SET_NAME's limit, in bytes of UTF-8
COMMIT = b"bufbroker.commit"  # a push's last message: without it nothing is named
_SIZE = b"bufbroker.size"
_NAME = b"bufbroker.name"
_COLUMN = pa.field("bytes", pa.large_binary(), nullable=False)


def name_from(raw: bytes | str) -> str:
    """A buffer name from a ticket or a descriptor path: UTF-8, 1 to 31 bytes (EINVAL)."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    try:
        name = data.decode()
    except UnicodeDecodeError:
        raise BrokerError(errno.EINVAL, "a buffer name must be UTF-8") from None
    if not 0 < len(data) <= MAX_NAME:
        raise BrokerError(errno.EINVAL, f"a buffer name has 1 to {MAX_NAME} bytes of UTF-8")
    return name


def schema_for(name: str, size: int) -> pa.Schema:
    """The stream's schema: one column; the exact byte length travels in the metadata."""
    return pa.schema([_COLUMN], metadata={_SIZE: str(size).encode(), _NAME: name.encode()})


def size_of(schema: pa.Schema, limit: int = 1 << 62) -> int:
    """The byte length a stream announces (EPROTO if it does not say, or says nonsense)."""
    if len(schema) != 1 or not schema.field(0).type.equals(pa.large_binary()):
        raise BrokerError(errno.EPROTO, "the stream is not a bufbroker buffer (one large_binary column)")
    raw = (schema.metadata or {}).get(_SIZE, b"")
    if not raw.isdigit() or not 0 < int(raw) <= limit:
        raise BrokerError(errno.EPROTO, f"the stream announces no valid size ({raw[:32]!r})")
    return int(raw)


def batches(data: pa.Buffer, schema: pa.Schema, chunk: int = CHUNK) -> Iterator[pa.RecordBatch]:
    """``data`` as record batches of one row each, ``chunk`` bytes at most, without a copy."""
    for offset in range(0, data.size, chunk):
        length = min(chunk, data.size - offset)
        offsets = pa.py_buffer(struct.pack("<qq", 0, length))
        array = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data.slice(offset, length)])
        yield pa.record_batch([array], schema=schema)


def chunk_bytes(batch: pa.RecordBatch) -> memoryview:
    """The bytes one received batch carries, as unsigned bytes (EPROTO if it is malformed)."""
    if batch.num_columns != 1 or batch.num_rows != 1:
        raise BrokerError(errno.EPROTO, "a chunk must be one row of one column")
    array = batch.column(0)
    if not array.type.equals(pa.large_binary()) or array.null_count:
        raise BrokerError(errno.EPROTO, "a chunk must be a non-null large_binary value")
    try:
        array.validate(full=True)  # offsets within the data buffer: the peer is not trusted
    except pa.ArrowInvalid as e:
        raise BrokerError(errno.EPROTO, f"a malformed chunk: {e}") from None
    _, offsets, data = array.buffers()
    start, end = struct.unpack_from("<qq", offsets, array.offset * 8)
    if data is None:
        return memoryview(b"")
    return memoryview(data).cast("B")[start:end]


def refusal(error: BrokerError) -> fl.FlightError:
    """The Flight error that carries ``error`` to the client, errno included."""
    number = error.errno or errno.EIO
    info = json.dumps({"code": errno_code(number), "message": error.strerror or ""}).encode()
    kind: type[fl.FlightError] = fl.FlightServerError
    if number in (errno.EACCES, errno.EPERM):
        kind = fl.FlightUnauthorizedError
    elif number in (errno.EAGAIN, errno.EBUSY):
        kind = fl.FlightUnavailableError
    return kind(error.strerror or errno_code(number), extra_info=info)


def translate(error: pa.ArrowException) -> BrokerError:
    """The ``BrokerError`` a failed Flight call stands for, on the client's side."""
    info = getattr(error, "extra_info", None)
    if info:
        try:
            detail = json.loads(info)
            return BrokerError(errno_from_code(detail["code"], errno.EIO), str(detail["message"]))
        except (ValueError, KeyError, TypeError):
            pass
    text = str(error).split(". Detail:")[0].split(". gRPC client debug context:")[0]
    match error:
        case fl.FlightUnauthenticatedError():
            number = errno.EPERM
        case fl.FlightUnauthorizedError():
            number = errno.EACCES
        case fl.FlightTimedOutError():
            number = errno.ETIMEDOUT
        case fl.FlightCancelledError():
            number = errno.ECANCELED
        case fl.FlightUnavailableError():
            number = errno.ECONNREFUSED
        case pa.ArrowKeyError():
            number = errno.ENOENT
        case _:
            number = errno.EIO
    return BrokerError(number, text or errno_code(number))
