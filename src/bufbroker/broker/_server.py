"""The trio server: accepts connections and moves messages between them and the state model.

One task per connection (plus one for every request that waits); one task watches every
handle; one the timelines that fences and waiting requests need; one closes, off the loop,
the descriptors clients gave and nobody keeps. ``serve`` follows trio's convention for
long-running entry points: it calls ``task_status.started()`` once it is accepting, and
returns only when cancelled.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Iterable

import trio

from .. import protocol as p
from ..protocol import BrokerError, ProtocolError
from ._backing_ops import Sealer
from ._config import Config
from ._connection import Awake, Connection
from ._discard import Discard
from ._fdstore import FdStore, Notifier, restore
from ._forward import Forwarder
from ._handles import HandleTable
from ._packets import inbox, receive
from ._reaper import Reaper
from ._records import Device
from ._shm import ShmHeap, ShmRecords, adopt
from ._state import State
from ._waiters import NameWaiters
from ._watch import TimelineWatch
from ._workers import Workers

__all__ = ["Server"]

log = logging.getLogger("bufbroker.broker")

_CRED = struct.Struct("3i")


def _command(pid: int) -> str:
    """The peer's command name (``comm``, at most 15 bytes).

    Not its command line: reading /proc/<pid>/cmdline takes the peer's memory lock, which the
    peer can hold to stall the reader (the whole loop); ``comm`` is kept beside the task.
    """
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return "?"


class Server:
    def __init__(
        self,
        config: Config,
        *,
        version: str,
        fdstore: Notifier | None = None,
        stored: list[tuple[int, str]] | None = None,
        shm_prefix: str | None = None,
    ) -> None:
        """``shm_prefix``: the names of this broker's shm objects; without one, no shm heap."""
        self._reaper = Reaper()
        self.state = State(config, free=self._reaper.free)
        self.workers = Workers()
        self._sealer = Sealer(self.state, self.workers)
        self.state.unwritten = self._sealer.want
        self.handles = HandleTable(self.state.handle_closed)
        self.timelines = TimelineWatch(self.handles, self.workers)
        self.timelines.attach(self.state.sync)
        self._fdstore: FdStore | None = None
        if fdstore is not None:
            generation = restore(stored or [], self.state, self.handles, fdstore)
            self._fdstore = FdStore(fdstore, self.state, self.handles, generation)
            self.state.observer = self._fdstore
            self.state.sync.observer = self._fdstore.timelines
        if shm_prefix is not None:
            shm = ShmHeap(shm_prefix)
            self.state.heaps[shm.name] = shm
            adopt(shm, self.state)
            self.state.observer = ShmRecords(self.state, self.state.observer)
        self.names = NameWaiters()
        self.stream_names = NameWaiters()  # subscribes waiting for a stream
        self.discard = Discard(self.workers)
        self.unmapped = trio.lowlevel.ParkingLot()  # a moved buffer's stale mapping went away
        self.state.post = self.post
        self.state.unmapped = lambda buffer: self._wake_moves()
        self.forwarder = Forwarder(self)
        self.version = version
        self.connections = 0
        self._live: set[Connection] = set()
        self._by_device: dict[int, Connection] = {}
        self.awake = Awake()

    def _wake_moves(self) -> None:
        self.unmapped.unpark_all()

    def post(self, device: Device, message: p.Event | p.Call) -> None:
        """Queue ``message`` for ``device``'s connection, if it is still there."""
        connection = self._by_device.get(device.id)
        if connection is not None:
            connection.post(message)

    def close_later(self, uid: int, fds: Iterable[int]) -> None:
        """Close descriptors a client of ``uid`` gave, off the loop (a close can block)."""
        self.discard.close(uid, list(fds))

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.handles.watch)
                nursery.start_soon(self.timelines.run)
                nursery.start_soon(self._reaper.run)
                nursery.start_soon(self.discard.run)
                nursery.start_soon(self._sealer.run)
                nursery.start_soon(self._let_go_of_adopted)
                if self._fdstore is not None:
                    nursery.start_soon(self._fdstore.run)
                task_status.started()
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as e:  # EMFILE and friends: back off, as trio's serve_listeners does
                        log.warning("accept failed: %s", e)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._client, sock)
        finally:
            self.handles.close()
            self.timelines.close()
            self._reaper.close()
            self.discard.close_now()

    async def _let_go_of_adopted(self) -> None:
        """Adopted buffers are held by the broker for a while, then only by their users."""
        kept = [b for b in self.state.buffers.values() if b.kept]
        if kept:
            await trio.sleep(self.state.config.shm_adopted_hold)
            for buffer in kept:
                self.state.let_go(buffer)

    async def announce_shutdown(self, grace: float = 0.5) -> None:
        """Tell every device the broker is stopping (the ``shutdown`` event), briefly."""
        with trio.move_on_after(grace):
            for connection in list(self._live):
                with contextlib.suppress(OSError):
                    await connection.send(p.Event(name="shutdown"))

    async def _client(self, sock: trio.socket.SocketType) -> None:
        with sock:
            pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            try:
                self.state.reserve.check(uid, [sock.fileno()])
                self.state.admit(uid)
            except BrokerError as e:
                await self._refuse(sock, e)
                return
            self.connections += 1
            try:
                device = await self._handshake(sock, pid, uid, gid)
                if device is None:
                    return
                log.debug("device %s connected", device.label)
                connection = Connection(self, sock, device)
                self._live.add(connection)
                self._by_device[device.id] = connection
                try:
                    await connection.run()
                except Exception:  # a bug must cost one connection, never the broker
                    log.exception("connection of %s failed", device.label)
                finally:
                    self._live.discard(connection)
                    del self._by_device[device.id]
                    if device.exporter:
                        self.forwarder.abort(
                            BrokerError(errno.ENODEV, f"the exporter {device.label} went away"),
                            exporter=device,
                        )
                    self.state.remove_device(device)
                    log.debug("device %s gone", device.label)
            finally:
                self.connections -= 1
                self.state.leave(uid)

    async def _refuse(self, sock: trio.socket.SocketType, error: BrokerError, id: int | None = None) -> None:
        """Tell the peer why, without waiting on it for long, then let the caller hang up."""
        with trio.move_on_after(1), contextlib.suppress(OSError):
            await sock.send(p.encode(p.Error.from_exception(id, error)))

    async def _handshake(self, sock: trio.socket.SocketType, pid: int, uid: int, gid: int) -> Device | None:
        cfg = self.state.config
        quotas = self.state.quotas
        try:
            quotas.begin_handshake(uid)
        except BrokerError as e:
            await self._refuse(sock, e)
            return None
        try:
            with trio.move_on_after(cfg.handshake_timeout):
                try:
                    data, fds, _ = await receive(sock, inbox(cfg.max_message_size), cfg.max_fds_per_message)
                except p.FdOverflow as e:
                    self.discard.close(uid, e.fds)
                    return None
                except OSError:
                    return None
                self.discard.close(uid, fds)  # hello carries none
                try:
                    message = p.decode(data)
                except BrokerError as e:
                    await self._refuse(sock, e, getattr(e, "id", None))
                    return None
                if not isinstance(message, p.Request) or not isinstance(message.args, p.Hello):
                    await self._refuse(sock, ProtocolError("the first request must be hello"))
                    return None
                hello = message.args
                if hello.version != p.PROTOCOL_VERSION:
                    await self._refuse(
                        sock,
                        BrokerError(
                            errno.EPROTONOSUPPORT,
                            f"protocol version {hello.version} is not supported "
                            f"(this broker speaks {p.PROTOCOL_VERSION})",
                        ),
                        message.id,
                    )
                    return None
                device = self.state.add_device(
                    name=hello.name,
                    pid=pid,
                    uid=uid,
                    gid=gid,
                    command=_command(pid),
                    constraints=hello.constraints,
                    exporter=hello.exporter,
                )
                reply = p.Reply(
                    id=message.id,
                    result={
                        "version": p.PROTOCOL_VERSION,
                        "device": device.id,
                        "broker": self.version,
                        "page_size": p.PAGE_SIZE,
                        # Said only to a device that asked: a version-1 reply is unchanged.
                        **({"exporter": True} if hello.exporter else {}),
                    },
                )
                try:
                    await sock.send(p.encode(reply))
                except OSError:
                    self.state.remove_device(device)
                    return None
                return device
            log.info("pid %d did not say hello within %ss; dropped", pid, cfg.handshake_timeout)
            return None
        finally:
            quotas.end_handshake(uid)
