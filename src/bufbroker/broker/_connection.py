"""One client connection: receive a packet, hand it to the state model, send the answer.

Every descriptor that arrives is owned by an ``FdBag`` until a handler takes it on purpose;
whatever is left goes to the server's ``Discard`` when the request is done, on every path, to
be closed off the loop (a client's descriptor can make close() wait). Requests are answered
in order, except ``open`` with a timeout and ``cpu_begin`` on a buffer whose reservation has
not signalled yet, which wait in their own tasks (up to max_pending_requests at once, and
max_waiting_opens_per_uid for the uid) so that a waiting request does not stall the
connection; each gives up its request's descriptors before it waits. So do requests an
exporter must answer (``_forward``). Events and notices for the device go
out in order through ``post``.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import select
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from .. import protocol as p
from ..protocol import BrokerError, ProtocolError, RequestError
from . import _buffer_ops, _stream_ops
from ._backing_ops import prepare_backing, seal
from ._chain import Chain
from ._outbox import Outbox
from ._packets import NO_FDS, FdBag, inbox, packet
from ._records import Device
from ._sync import Points

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["Awake", "Connection"]

log = logging.getLogger("bufbroker.broker")

FAIRNESS = 16  # requests served without yielding to other tasks, at most
# Ops whose answer depends on which buffers are still alive (quotas, names, listings): before
# them, handles the peer closed before sending are counted as closed, as the kernel would.
_SETTLE_FIRST = frozenset(
    {
        p.Allocate,
        p.Export,
        p.ExportMemfd,
        p.Open,
        p.SetName,
        p.Buffers,
        p.Devices,
        p.Stats,
        p.Heaps,
        p.MakeTimeline,
        p.MakeFence,
        p.MergeFences,
        p.ExportFence,
        p.Timelines,
        p.Publish,
        p.Subscribe,
        p.Streams,
    }
)
# Ops that may wait for the kernel in a worker thread before they are answered (_workers).
_OFF_LOOP = frozenset({p.Map, p.CpuBegin, p.Seal})


class Awake:
    """How many connections are awake: between two waits for their peer's next request.

    When others are, a connection that has answered lets them run before it looks for its
    peer's next request: by then the peer has usually sent it, and the look succeeds instead
    of costing a failed receive and a wait (an epoll_ctl and a trip through the scheduler).
    With nobody else awake it looks at once, and yields only every FAIRNESS requests: a peer
    sending back to back is served without the scheduler. (Waiting first when alone would
    save a lone peer that waits for each answer one failed receive, but costs more under
    load; docs/PERFORMANCE.md has both measured.) A connection waiting to send to a peer that
    does not read its answers counts as awake: meanwhile the others yield before each request,
    which costs them a little time and nothing else.
    """

    def __init__(self) -> None:
        self.count = 0


class Connection:
    def __init__(self, server: Server, sock: trio.socket.SocketType, device: Device) -> None:
        self.server = server
        self.state = server.state
        self.discard = server.discard
        self.sock = sock
        self.device = device
        self.pending = 0
        self.chain = Chain()
        self.gone = False  # a send failed: the peer went away
        self._send_lock = trio.Lock()
        # The same socket as a plain non-blocking stdlib object, for sends and receives that
        # complete at once (most do); trio's own calls are used whenever one would block.
        self._raw = socket.socket(fileno=sock.fileno())
        self._raw.setblocking(False)
        self._scope = trio.CancelScope()  # the serving loop's: cancelled to hang up
        self._outbox = Outbox(self._raw, self._send, self.state.config.max_queued_events, self._hang_up)

    def post(self, message: p.Event | p.Call) -> None:
        """Send ``message`` soon, in order, never waiting (see ``Outbox``)."""
        if not self.gone:
            self._outbox.post(message)

    def _hang_up(self, why: str) -> None:
        if why:
            log.warning("closing %s: %s", self.device.label, why)
        self.gone = True
        self._scope.cancel()

    async def _forwarded(self, request: p.Request, args: p.OpArgs) -> None:
        """A request an exporter must answer (``args``: resolved), in a task of its own."""
        try:
            await self._forward(request, args)
            await self._answer_waiting(request)
        finally:
            self.pending -= 1

    async def _forward(self, request: p.Request, args: p.OpArgs) -> None:
        """Answer ``request`` once its exporter has (see ``_forward``)."""
        owned: list[int] = []
        result: Any = None
        try:
            try:
                result, owned = await self.server.forwarder.answer(self.device, args)
                data = p.encode_reply(request.id, result)
            except BrokerError as e:
                data = p.encode(p.Error.from_exception(request.id, e))
            except Exception:
                log.exception("%s failed for %s", request.op, self.device.label)
                data = p.encode(p.Error(id=request.id, errno=errno.EIO, message="internal broker error"))
            self.chain.answered(request, result)
            sending, owned = owned, []
            await self._send(data, sending)
        finally:
            p.close_all(owned)

    async def send(self, message: p.Message, owned: Sequence[int] = ()) -> None:
        """Send ``message`` with the descriptors ``owned``, which are closed afterwards."""
        await self._send(p.encode(message), owned)

    async def _send(self, data: bytes, owned: Sequence[int]) -> None:
        """Send one packet; ``owned`` is closed afterwards. A failed send marks the peer gone.

        Tried non-blocking first, which needs no lock: a SEQPACKET send is one whole packet
        or nothing. Only a send that would block waits, the trio way, under the lock (trio
        lets one task at a time wait to send on a socket).
        """
        try:
            try:
                if owned:
                    self._raw.sendmsg([data], p.ancillary(owned))
                else:
                    self._raw.send(data)
            except BlockingIOError:  # the peer's queue is full: wait for room
                async with self._send_lock:
                    if owned:
                        await self.sock.sendmsg([data], p.ancillary(owned))
                    else:
                        await self.sock.send(data)
        except (OSError, trio.ClosedResourceError) as e:
            if not isinstance(e, BrokenPipeError | ConnectionResetError | trio.ClosedResourceError):
                log.warning("cannot send %d bytes to %s: %s", len(data), self.device.label, e)
            self.gone = True
        finally:
            if owned:
                p.close_all(owned)

    async def _receive(self, inbox: mmap.mmap, max_fds: int) -> tuple[memoryview, list[int], bool]:
        """The peer's next packet, as ``receive`` gives it, the quick way.

        A packet already waiting is taken with a plain non-blocking call, without going
        through trio's scheduler (trio's socket calls yield even when the system call succeeds
        at once); only the wait for one goes through trio. While other connections are awake,
        they run first (see ``Awake``).
        """
        raw, awake = self._raw, self.server.awake
        space = p.ancillary_space(max_fds)
        if awake.count > 1:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                n, ancdata, flags, _ = raw.recvmsg_into([inbox], space, p.RECV_FLAGS)
                return packet(inbox, n, ancdata, flags, max_fds)
            except BlockingIOError:
                awake.count -= 1
                try:
                    await trio.lowlevel.wait_readable(raw)
                finally:
                    awake.count += 1

    def _hung_up(self) -> bool:
        """After a read of nothing: end of file, or an empty packet from a peer still there?

        SOCK_SEQPACKET reads both as zero bytes; only the shutdown of the peer's side tells.
        """
        poll = select.poll()
        poll.register(self._raw.fileno(), select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poll.poll(0))

    async def run(self) -> None:
        cfg = self.state.config
        buffer = inbox(cfg.max_message_size)
        self.server.awake.count += 1
        try:
            await self._serve(buffer)
        finally:
            self.server.awake.count -= 1
            self.gone = True
            self._raw.detach()  # the descriptor is trio's socket's to close

    async def _serve(self, buffer: mmap.mmap) -> None:
        cfg = self.state.config
        max_fds = cfg.max_fds_per_message
        uid = self.device.uid
        forwarder, state = self.server.forwarder, self.state
        served = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._outbox.run)
            with self._scope:
                while not self.gone:
                    served += 1
                    if served % FAIRNESS == 0:
                        await trio.lowlevel.checkpoint()  # let others run, and cancellation in
                    if self.discard.pending(uid):
                        await self.discard.wait_room(uid)  # this uid's closes first, nobody else's
                    try:
                        data, fds, truncated = await self._receive(buffer, max_fds)
                    except p.FdOverflow as e:
                        self.discard.close(uid, e.fds)
                        await self.send(p.Error.from_exception(None, e))
                        continue
                    except OSError:
                        break  # ECONNRESET and the like: the peer is gone
                    if not data and not fds:
                        if self._hung_up():
                            break  # end of file
                        await self.send(p.Error.from_exception(None, ProtocolError("an empty packet")))
                        break
                    bag = FdBag(fds, self.discard, uid) if fds else NO_FDS
                    try:
                        if fds and not self.state.reserve.allows(uid, max(fds)):
                            try:
                                self.state.reserve.check(uid, fds)
                            except BrokerError as e:  # EMFILE: these are kept for root
                                raise RequestError(p.peek_request_id(data) or 0, e) from None
                        if truncated:
                            raise RequestError(
                                p.peek_request_id(data) or 0,
                                BrokerError(
                                    errno.EMSGSIZE, f"a message may be at most {cfg.max_message_size} bytes"
                                ),
                            )
                        message = p.decode(data, fds, max_items=cfg.max_message_size)
                        if type(message) in (p.Answer, p.Refusal) and self.device.exporter:
                            forwarder.answered(self.device, message, bag)  # type: ignore[arg-type]
                            continue
                        if type(message) is not p.Request:
                            raise ProtocolError("clients send requests only")
                        if self.pending >= cfg.max_pending_requests:
                            raise RequestError(
                                message.id,
                                BrokerError(
                                    errno.EAGAIN,
                                    f"max_pending_requests ({cfg.max_pending_requests}) in flight",
                                ),
                            )
                        if type(message.args) is p.Subscribe and message.args.timeout:
                            _stream_ops.park_subscribe(self, nursery, message)
                            continue
                        if type(message.args) is p.Open and message.args.timeout:
                            self._park_open(nursery, message)
                            continue
                        if (blocker := self.chain.blocker(message.args)) is not None:
                            self.chain.wait(message, blocker)  # its descriptors are discarded now
                            self.pending += 1
                            continue
                        if type(message.args) is p.CpuBegin and (points := self._reserved(message.args)):
                            self._park_cpu(nursery, message, points)
                            continue
                        if state.exporters and self._start_forward(nursery, message):
                            continue
                        await self._send(*await self._respond(message, bag))
                    except RequestError as e:
                        await self.send(p.Error.from_exception(e.id, e))
                    except ProtocolError as e:
                        log.info("closing %s: %s", self.device.label, e.strerror)
                        await self.send(p.Error.from_exception(None, e))
                        break
                    finally:
                        bag.close()
            nursery.cancel_scope.cancel()

    def _failed(self, request: p.Request, e: Exception) -> bytes:
        """The error packet that answers ``request`` which raised ``e``."""
        if isinstance(e, OSError):  # BrokerError, or a syscall on the peer's descriptor that failed
            error = e if isinstance(e, BrokerError) else BrokerError(e.errno or errno.EIO, str(e))
            return p.encode(p.Error.from_exception(request.id, error))
        log.exception("%s failed for %s", request.op, self.device.label, exc_info=e)
        return p.encode(p.Error(id=request.id, errno=errno.EIO, message="internal broker error"))

    def _answer(self, request: p.Request, bag: FdBag) -> tuple[bytes, Sequence[int]]:
        """The packet that answers ``request``, and the descriptors to send with it."""
        try:
            result, owned = self._handle(request, self.chain.resolve(request.args), bag)
        except Exception as e:
            self.chain.answered(request, None)
            return self._failed(request, e), ()
        self.chain.answered(request, result)
        try:
            packet = p.encode_reply(request.id, result)
        except BaseException:
            p.close_all(owned)
            raise
        if len(packet) > p.MAX_REPLY_BYTES:  # a bug: never send what a client may not receive
            p.close_all(owned)
            log.error("%s for %s made a reply of %d bytes", request.op, self.device.label, len(packet))
            refusal = p.Error(id=request.id, errno=errno.EMSGSIZE, message="the reply is too large")
            return p.encode(refusal), ()
        return packet, owned

    async def _respond(self, request: p.Request, bag: FdBag) -> tuple[bytes, Sequence[int]]:
        """``_answer``, after the kernel work the request needs, done in a worker thread."""
        if type(request.args) not in _OFF_LOOP:
            return self._answer(request, bag)
        state, workers = self.state, self.server.workers
        try:
            args = self.chain.resolve(request.args)
            if type(args) is p.Seal:
                assert isinstance(args.buffer, int)
                buffer = await seal(state, workers, self.device, args.buffer)
                if buffer.name:  # the opens waiting for it to be sealed
                    self.server.names.appeared((buffer.owner, buffer.name))
                return p.encode_reply(request.id, _buffer_ops.seal_state(buffer)), ()
            await prepare_backing(state, workers, self.device, args)
        except Exception as e:
            return self._failed(request, e), ()
        return self._answer(request, bag)

    async def send_answer(self, request: p.Request) -> None:
        """Answer a request that waited in its own task (its descriptors were discarded), then
        the requests that referred to it."""
        await self._send(*await self._respond(request, NO_FDS))
        await self._answer_waiting(request)

    def _park_open(self, nursery: trio.Nursery, request: p.Request) -> None:
        """Start an ``open`` that waits for its name, charged to the uid.

        Its request's descriptors stay with the caller's bag, which discards them at once: a
        waiting request holds nothing but its place among the name's waiters.
        """
        args = request.args
        assert isinstance(args, p.Open)
        try:
            key = self.state.name_key(self.device, args.name, args.uid)
            self.state.quotas.begin_wait(self.device.uid)
        except BrokerError as e:
            raise RequestError(request.id, e) from None
        self.pending += 1
        self.chain.unanswered(request.id)
        nursery.start_soon(self._waiting_open, request, key)

    def _ready(self, key: tuple[int, str], sealed: bool) -> bool:
        buffer = self.state.names.get(key)
        return buffer is not None and (buffer.sealed or not sealed)

    async def _waiting_open(self, request: p.Request, key: tuple[int, str]) -> None:
        """``open`` that waits for the name to appear (sealed, if asked): Plasma's get."""
        args = request.args
        assert isinstance(args, p.Open)
        try:
            with trio.move_on_after(args.timeout or 0):
                while not self._ready(key, args.sealed):
                    await self.server.names.wait(key)
            again = p.Open(name=args.name, uid=args.uid, sealed=args.sealed)
            answer = p.Request(id=request.id, op="open", args=again)
            await self._send(*self._answer(answer, NO_FDS))
            await self._answer_waiting(request)
        finally:
            self.pending -= 1
            self.state.quotas.end_wait(self.device.uid)

    def _start_forward(self, nursery: trio.Nursery, request: p.Request) -> bool:
        """Start ``request`` if an exporter must answer it (True); later ones that refer to it
        wait for it."""
        try:
            args = self.chain.resolve(request.args)
        except BrokerError:
            return False  # _answer says why
        if not self.server.forwarder.wants(self.device, args):
            return False
        self.pending += 1
        self.chain.unanswered(request.id)
        nursery.start_soon(self._forwarded, request, args)
        return True

    def _reserved(self, args: p.CpuBegin) -> Points:
        """The reservation's points a cpu access must wait for (none if the request is bad)."""
        try:
            resolved = self.chain.resolve(args)
            assert isinstance(resolved, p.CpuBegin) and type(resolved.buffer) is int
            buffer = self.state.share(self.device, resolved.buffer, readonly=not args.access.writes)
            return self.state.sync.reservation_points(buffer, args.access)
        except BrokerError:
            return {}  # answered in turn, with this error

    def _park_cpu(self, nursery: trio.Nursery, request: p.Request, points: Points) -> None:
        """Start a ``cpu_begin`` that waits for its buffer's fences, charged to the uid."""
        try:
            self.state.quotas.begin_wait(self.device.uid)
        except BrokerError as e:
            raise RequestError(request.id, e) from None
        self.pending += 1
        self.chain.unanswered(request.id)
        nursery.start_soon(self._waiting_cpu, request, points)

    async def _waiting_cpu(self, request: p.Request, points: Points) -> None:
        """``cpu_begin`` parked until its reservation signals, as DMA_BUF_IOCTL_SYNC waits;
        then answered, by the buffer's exporter if it has one (begin_cpu_access comes after)."""
        assert isinstance(request.args, p.CpuBegin)
        sync = self.state.sync
        signalled = trio.Event()
        wait = sync.park(points, lambda _: signalled.set())
        try:
            timeout = request.args.timeout
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await signalled.wait()
            if not signalled.is_set():
                error = BrokerError(errno.ETIME, f"the buffer's fences did not signal within {timeout} s")
                self.chain.answered(request, None)
                await self.send(p.Error.from_exception(request.id, error))
            elif self.state.exporters and self._forwarded_to(request):
                await self._forward(request, self.chain.resolve(request.args))
            else:
                await self._send(*await self._respond(request, NO_FDS))
            await self._answer_waiting(request)
        finally:
            sync.cancel(wait)
            self.pending -= 1
            self.state.quotas.end_wait(self.device.uid)

    def _forwarded_to(self, request: p.Request) -> bool:
        """Whether an exporter answers ``request`` (a bad reference is answered here)."""
        try:
            return self.server.forwarder.wants(self.device, self.chain.resolve(request.args))
        except BrokerError:
            return False

    async def _answer_waiting(self, request: p.Request) -> None:
        """Answer, in order, the requests that waited for ``request`` (just answered)."""
        for follower in self.chain.take(request.id):
            self.pending -= 1
            try:
                args = self.chain.resolve(follower.args)
            except BrokerError:
                args = follower.args  # _answer says why
            if self.server.forwarder.wants(self.device, args):
                await self._forward(follower, args)
            else:
                await self._send(*await self._respond(follower, NO_FDS))
            await self._answer_waiting(follower)

    # --- the ops -------------------------------------------------------------------------

    def _handle(self, request: p.Request, args: p.OpArgs, bag: FdBag) -> tuple[Any, list[int]]:
        """Apply one request (``args``: its arguments, references resolved) to the state;
        returns (result, descriptors to send and close)."""
        if type(args) in _SETTLE_FIRST:
            self.server.handles.settle()
        return _buffer_ops.answer(self, request, args, bag)
