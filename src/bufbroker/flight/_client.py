"""Fetch a remote buffer into the local broker, push a local buffer to a remote one.

Both calls block until the transfer is complete and are cancellable three ways: ``timeout``
bounds the whole call (gRPC's deadline), ``cancel`` (a ``threading.Event`` another thread may
set) stops it between chunks, and Ctrl-C interrupts it (pyarrow checks for signals while it
waits). Whatever way a transfer ends early, it leaves nothing behind: a fetch releases the
buffer it was filling, and a push never sends its commit, so the remote names nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.flight as fl

from ..client import Buffer, Device
from ..protocol import BrokerError, Direction
from . import _wire as wire
from ._policy import bearer

__all__ = ["Progress", "drop", "fetch", "push"]

_SCHEMES = ("grpc://", "grpc+tcp://", "grpc+tls://", "grpc+unix://")

Progress = Callable[[int, int], None]
"""Called after each chunk with (bytes so far, total bytes)."""


@contextmanager
def _flight(location: str, tls_root_certs: bytes | None) -> Iterator[fl.FlightClient]:
    """A Flight client for one call; every Flight failure leaves as a ``BrokerError``."""
    if not location.startswith(_SCHEMES):
        raise BrokerError(
            errno.EINVAL, f"a Flight location is grpc://HOST:PORT or grpc+tls://..., not {location!r}"
        )
    client = None
    try:
        client = fl.connect(location, tls_root_certs=tls_root_certs)
        yield client
    except pa.ArrowException as e:
        raise wire.translate(e) from None
    finally:
        if client is not None:
            client.close()


def _options(timeout: float | None, token: str | None) -> fl.FlightCallOptions:
    headers = [bearer(token)] if token is not None else None
    return fl.FlightCallOptions(timeout=timeout, headers=headers)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise BrokerError(errno.ECANCELED, "the transfer was cancelled")


def fetch(
    location: str,
    name: str,
    *,
    device: Device,
    timeout: float | None = None,
    token: str | None = None,
    tls_root_certs: bytes | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> Buffer:
    """The buffer ``name`` served at ``location``, copied into a new buffer of ``device``'s broker.

    The new buffer is unnamed and held by ``device`` (close it, or name it with ``set_name``).
    It holds a snapshot of the remote bytes, as they were while they were read.
    """
    wire.name_from(name)
    with _flight(location, tls_root_certs) as client:
        reader = client.do_get(fl.Ticket(name.encode()), options=_options(timeout, token))
        try:
            size = wire.size_of(reader.schema)
            buffer = device.allocate(size)
            try:
                # The view is released on every way out, before the unmap: a view that an
                # exception's frames still held would make the unmap refuse (EBUSY).
                with (
                    buffer.attach() as attachment,
                    attachment.map(Direction.FROM_DEVICE) as mapping,
                    mapping.memory as memory,
                ):
                    _receive(reader, memory, size, cancel, progress)
            except BaseException:
                buffer.close()
                raise
        except BaseException:
            with contextlib.suppress(pa.ArrowException):
                reader.cancel()
            raise
    return buffer


def _receive(
    reader: fl.FlightStreamReader,
    memory: memoryview,
    size: int,
    cancel: threading.Event | None,
    progress: Progress | None,
) -> None:
    received = 0
    while True:
        _check(cancel)
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        if chunk.data is None:
            continue
        data = wire.chunk_bytes(chunk.data)
        end = received + len(data)
        if end > size:
            raise BrokerError(errno.EPROTO, f"the stream sent more than the {size} bytes it announced")
        memory[received:end] = data
        received = end
        if progress is not None:
            progress(received, size)
    if received != size:
        raise BrokerError(errno.EPROTO, f"the stream ended after {received} of {size} bytes")


def push(
    location: str,
    buffer: Buffer,
    *,
    name: str,
    timeout: float | None = None,
    token: str | None = None,
    tls_root_certs: bytes | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    chunk: int = wire.CHUNK,
) -> int:
    """Copies ``buffer`` into a new buffer named ``name`` at ``location``; returns its remote id.

    The remote service holds it until ``drop(location, name)`` or until the service stops; it
    is named only once every byte has arrived, so a push that fails leaves no such name.
    Sends straight from a mapping of ``buffer``, without a copy on this side.
    """
    wire.name_from(name)
    size = buffer.size
    schema = wire.schema_for(name, size)
    with buffer.attach() as attachment, attachment.map(Direction.TO_DEVICE) as mapping:
        view = mapping.memory[:size]
        try:
            return _send(
                location,
                name,
                pa.py_buffer(view),
                schema,
                chunk,
                timeout,
                token,
                tls_root_certs,
                cancel,
                progress,
            )
        except BaseException as e:
            _clear_frames(e)
            raise
        finally:
            view.release()


def _clear_frames(error: BaseException | None) -> None:
    """Drops the locals of the frames an exception keeps (and of those it was raised from).

    They hold Arrow buffers over the mapping, which must be let go before it can be unmapped.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _send(
    location: str,
    name: str,
    data: pa.Buffer,
    schema: pa.Schema,
    chunk: int,
    timeout: float | None,
    token: str | None,
    tls_root_certs: bytes | None,
    cancel: threading.Event | None,
    progress: Progress | None,
) -> int:
    descriptor = fl.FlightDescriptor.for_path(name)
    with _flight(location, tls_root_certs) as client:
        writer, acks = client.do_put(descriptor, schema, options=_options(timeout, token))
        # On any early exit the client is closed with the call unfinished: gRPC cancels it, and
        # the service, which never saw the commit, names nothing.
        sent = 0
        for batch in wire.batches(data, schema, chunk):
            _check(cancel)
            writer.write_batch(batch)
            sent += batch.column(0).buffers()[2].size
            if progress is not None:
                progress(sent, data.size)
        _check(cancel)
        writer.write_metadata(wire.COMMIT)
        writer.done_writing()
        ack = acks.read()
        writer.close()
    try:
        return int(json.loads(ack.to_pybytes())["id"]) if ack is not None else -1
    except (ValueError, KeyError, TypeError):
        return -1


def drop(
    location: str,
    name: str,
    *,
    timeout: float | None = None,
    token: str | None = None,
    tls_root_certs: bytes | None = None,
) -> None:
    """Asks the service at ``location`` to let go of the buffer ``name`` it received."""
    action = fl.Action("drop", name.encode())
    with _flight(location, tls_root_certs) as client:
        for _ in client.do_action(action, options=_options(timeout, token)):
            pass
