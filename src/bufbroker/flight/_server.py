"""The Flight service: a client of the local broker that serves and accepts named buffers.

Every transfer has a broker connection of its own, so that whatever a transfer holds (an
opened buffer, its attachment and mapping, a half-written upload) is dropped by the broker the
moment that connection closes, on every path. A fetch serves straight from its mapping (see
``_lease``); a push lands in a new, unnamed buffer that is named only after its last byte and
the client's commit, so that a failed or cancelled push leaves nothing anyone can open. The
service keeps one handle to each buffer it received, until a ``drop`` action or until it stops.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow.flight as fl

from .. import connect
from ..client import Device
from ..protocol import BrokerError, Direction
from . import _wire as wire
from ._lease import Lease
from ._policy import Policy, TokenCheck

__all__ = ["FlightService"]

DROP = "drop"


class FlightService(fl.FlightServerBase):  # type: ignore[misc]
    """Serves the local broker's named buffers that ``policy`` allows, on ``location``."""

    def __init__(
        self,
        location: str,
        *,
        policy: Policy,
        socket: str | None = None,
        token: str | None = None,
        tls_certificates: Sequence[tuple[bytes, bytes]] = (),
        chunk: int = wire.CHUNK,
        max_transfers: int = 16,
    ) -> None:
        middleware = {"token": TokenCheck(token)} if token is not None else None
        super().__init__(location, tls_certificates=list(tls_certificates) or None, middleware=middleware)
        self.policy = policy
        self._socket = socket
        self._chunk = chunk
        self._slots = threading.BoundedSemaphore(max_transfers)
        self._lock = threading.Lock()
        self._kept: dict[str, int] = {}  # received buffers: name -> the handle the service holds

    # --- helpers ----------------------------------------------------------------------------

    def _connect(self, role: str) -> Device:
        return connect(f"flight-{role}", socket=self._socket)

    def _take_slot(self) -> threading.Semaphore:
        if not self._slots.acquire(blocking=False):
            raise BrokerError(errno.EAGAIN, "the service has as many transfers as it allows; try again")
        return self._slots

    # --- reading ----------------------------------------------------------------------------

    def list_flights(self, context: fl.ServerCallContext, criteria: bytes) -> Iterator[fl.FlightInfo]:
        try:
            with self._connect("list") as device:
                entries = device.buffers()
        except BrokerError as e:
            raise wire.refusal(e) from None
        me = os.geteuid()
        for entry in entries:
            name = entry["name"]
            # Root's listing shows every uid's names, but open resolves only its own.
            if name and entry["owner"] == me and self.policy.readable(name):
                yield _info(name, entry["size"])

    def get_flight_info(
        self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor
    ) -> fl.FlightInfo:
        try:
            name = _descriptor_name(descriptor)
            self.policy.check_read(name)
            with self._connect("info") as device:
                size = device.open(name).size
        except BrokerError as e:
            raise wire.refusal(e) from None
        return _info(name, size)

    def do_get(self, context: fl.ServerCallContext, ticket: fl.Ticket) -> fl.GeneratorStream:
        try:
            name = wire.name_from(ticket.ticket)
            self.policy.check_read(name)
            lease = self._lease(name)
        except BrokerError as e:
            raise wire.refusal(e) from None
        data = lease.buffer()
        del lease  # from here on only the batches hold it
        schema = wire.schema_for(name, data.size)
        return fl.GeneratorStream(schema, wire.batches(data, schema, self._chunk))

    def _lease(self, name: str) -> Lease:
        slot = self._take_slot()
        try:
            device = self._connect("get")
        except BaseException:
            slot.release()
            raise
        try:
            buffer = device.open(name, map=Direction.TO_DEVICE)  # opened, attached, mapped: one round trip
            assert buffer.mapping is not None
            return Lease(device, buffer.mapping.memory[: buffer.size], slot)
        except BaseException:
            device.close()
            slot.release()
            raise

    # --- writing ----------------------------------------------------------------------------

    def do_put(
        self,
        context: fl.ServerCallContext,
        descriptor: fl.FlightDescriptor,
        reader: fl.MetadataRecordBatchReader,
        writer: fl.FlightMetadataWriter,
    ) -> None:
        try:
            name = _descriptor_name(descriptor)
            self.policy.check_write(name)
            slot = self._take_slot()
            try:
                with self._connect("put") as device:
                    buffer_id = self._receive(device, name, reader)
            finally:
                slot.release()
        except BrokerError as e:
            raise wire.refusal(e) from None
        writer.write(json.dumps({"id": buffer_id}).encode())

    def _receive(self, device: Device, name: str, reader: fl.MetadataRecordBatchReader) -> int:
        """Lands an upload in a new buffer; names it and keeps a handle only once complete."""
        _check_free(device, name)
        size = wire.size_of(reader.schema)
        buffer = device.allocate(size)
        with (
            buffer.attach() as attachment,
            attachment.map(Direction.FROM_DEVICE) as mapping,
            mapping.memory as memory,  # released on every way out, before the unmap
        ):
            received, committed = _copy_in(reader, memory, size)
        if received != size or not committed:
            raise BrokerError(errno.EPROTO, f"the upload ended after {received} of {size} bytes, uncommitted")
        handle = buffer.share()
        try:
            buffer.set_name(name)  # EEXIST if the name was taken meanwhile
        except BaseException:
            os.close(handle)
            raise
        with self._lock:
            # A buffer it kept under this name was renamed or unnamed locally since: the name
            # now means this one, and the service lets go of the old one, as a drop would.
            older = self._kept.pop(name, None)
            self._kept[name] = handle
        if older is not None:
            os.close(older)
        return buffer.id

    def list_actions(self, context: fl.ServerCallContext) -> list[tuple[str, str]]:
        return [(DROP, "let go of a buffer this service received (body: its name)")]

    def do_action(self, context: fl.ServerCallContext, action: fl.Action) -> Iterator[bytes]:
        try:
            if action.type != DROP:
                raise BrokerError(errno.ENOTTY, f"no action {action.type!r}")
            name = wire.name_from(action.body.to_pybytes())
            self.policy.check_write(name)
            with self._lock:
                handle = self._kept.pop(name, None)
            if handle is None:
                raise BrokerError(errno.ENOENT, f"this service holds no buffer named {name!r}")
            os.close(handle)
        except BrokerError as e:
            raise wire.refusal(e) from None
        return iter(())

    def close_kept(self) -> None:
        """Let go of every received buffer (at shutdown)."""
        with self._lock:
            handles, self._kept = list(self._kept.values()), {}
        for handle in handles:
            os.close(handle)


def _check_free(device: Device, name: str) -> None:
    """EEXIST early, before any byte is received, if ``name`` is taken (set_name checks again)."""
    try:
        device.open(name)
    except BrokerError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    raise BrokerError(errno.EEXIST, f"a buffer named {name!r} exists already")


def _copy_in(reader: fl.MetadataRecordBatchReader, memory: memoryview, size: int) -> tuple[int, bool]:
    """Copies chunks into ``memory``: the bytes received, and whether the client committed."""
    received = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return received, False
        if chunk.data is not None:
            data = wire.chunk_bytes(chunk.data)
            end = received + len(data)
            if end > size:
                raise BrokerError(errno.EMSGSIZE, f"the upload exceeds the {size} bytes it announced")
            memory[received:end] = data
            received = end
        if chunk.app_metadata is not None and chunk.app_metadata.to_pybytes() == wire.COMMIT:
            return received, True


def _descriptor_name(descriptor: fl.FlightDescriptor) -> str:
    path: Any = descriptor.path
    if descriptor.descriptor_type != fl.DescriptorType.PATH or not path or len(path) != 1:
        raise BrokerError(errno.EINVAL, "name the buffer with a one-element descriptor path")
    return wire.name_from(path[0])


def _info(name: str, size: int) -> fl.FlightInfo:
    schema = wire.schema_for(name, size)
    endpoint = fl.FlightEndpoint(name.encode(), [])
    return fl.FlightInfo(schema, fl.FlightDescriptor.for_path(name), [endpoint], 1, size)
