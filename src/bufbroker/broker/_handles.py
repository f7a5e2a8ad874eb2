"""Handles: socketpair ends whose last close, anywhere, the kernel reports to the broker.

The broker keeps one end of each pair and sends the other (it never keeps a copy of the
client end). When every copy of the client end is closed, in any process or still in flight
inside some Unix socket, the kernel shuts the broker's end down (EPOLLHUP): the handle is gone.

A handle is known by the SO_COOKIE of its client end: 64 bits the kernel never hands out
twice. (Inode numbers come from a 32-bit counter that wraps, and a socket made later could
then import as someone's handle.)

Thousands of handles are watched through one epoll instance that trio waits on as a single
readable descriptor, instead of a task parked on each handle (a parked task costs ~2.8 KB).
The broker's end is shut down for reading as it is minted, so a holder cannot write into a
handle at all (EPIPE): there is nothing to drain, and nothing queued in it to free at close.

The kernel frees a dma-buf as its last fd is closed; here the news arrives a little later, when
the watcher runs. ``settle`` takes what the kernel has already reported, so that a request sent
after a close (an allocate at the quota, an open of a name just let go, a listing) sees it.

A fence is minted the same way, without the byte, so that its client end reads nothing until it
is signalled (``signal``): then the broker queues the byte and shuts its end down for writing,
so that every copy turns readable: one byte, then end-of-file. The broker's end, shut down both
ways, reports EPOLLHUP for ever from then on, so it is watched edge-triggered. The one event
its own shutdown causes is passed over, unless the kernel reset the end meanwhile (the last
close came at once); any later event is a last close (a reset, while nobody read the byte) or
a holder's shutdown, looked up as below.

A holder that calls ``shutdown(SHUT_RD)`` on its copy shuts the broker's end down too, exactly
as the last close would. Such hang-ups are checked against the kernel's socket table
(sock_diag, by inode and cookie) in a worker thread, at most LOOKUPS_PER_UID of each uid's
handles per round: a client end that still exists was only shut down, and is looked up again
every RECHECK seconds until it is really closed.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Iterable

import trio

from ._records import Key
from ._sockdiag import SocketDiag, socket_cookie

handle_key: Callable[[int], Key] = socket_cookie
"""The key of the handle ``fd`` is (OSError, ENOTSOCK, for what cannot be one)."""

__all__ = ["RECHECK", "HandleTable", "handle_key"]

log = logging.getLogger("bufbroker.broker")

RECHECK = 1.0  # seconds between lookups of a handle that a holder shut down
ROUND_GAP = 0.05  # seconds at least between two rounds of lookups
LOOKUPS_PER_UID = 32  # handles of one uid looked up in one round, at most

_CLOSED = select.EPOLLHUP | select.EPOLLERR
_SETTLE_ROUNDS = 64  # of 256 events: a bound on the work of one settle


def _reset(fd: int) -> bool:
    """Whether the kernel reset the broker's end ``fd``: its peer was released with data unread.

    Every handle is minted with one byte queued in the client end, which no client reads. When
    the last copy is closed, the kernel drops that byte and sets ECONNRESET on the broker's end
    (unix_release_sock): a close that needs no lookup. A holder that read the byte, or one that
    only called shutdown(), leaves no reset, and the kernel's socket table decides.
    """
    end = socket.socket(fileno=fd)
    try:
        return end.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    finally:
        end.detach()


class _End:
    """The broker's end of one handle: what it is known by, and whom it is charged to."""

    __slots__ = ("due", "ino", "key", "quiet", "uid")

    def __init__(self, key: Key, ino: int, uid: int) -> None:
        self.key = key
        self.ino = ino  # of the client end, for sock_diag
        self.uid = uid
        self.due = 0.0  # while unsure: when to look it up next
        self.quiet = False  # a signalled fence's end: its next event is its own shutdown's


class HandleTable:
    def __init__(self, closed: Callable[[Key], None]) -> None:
        """``closed(key)`` is called for each handle whose last copy was closed."""
        self._closed = closed
        self._epoll = select.epoll()
        self._ends: dict[int, _End] = {}  # by broker-end fd (a bare int: a socket object is 100 bytes)
        self._by_key: dict[Key, int] = {}
        # Broker ends hung up without a reset (off epoll, to look up), per uid, in the order
        # they are due: each is appended when it becomes due or is put off by RECHECK.
        self._unsure: dict[int, deque[int]] = {}
        self._parked: trio.CancelScope | None = None  # the watcher's wait, while it waits
        try:
            self._diag: SocketDiag | None = SocketDiag()
        except OSError as e:
            self._diag = None
            log.warning(
                "sock_diag is unavailable (%s): a holder that calls shutdown() on a handle ends it "
                "for every holder",
                e.strerror or e,
            )

    def __len__(self) -> int:
        return len(self._ends)

    def mint(self, uid: int, *, fence: bool = False) -> tuple[int, int, Key]:
        """A new handle for ``uid``: (broker end, client end, key); the caller sends the client end,
        then closes it, or gives both back with ``discard``. A fence's reads nothing until ``signal``."""
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            key = handle_key(theirs.fileno())
            ino = os.fstat(theirs.fileno()).st_ino  # our own socket: nothing can make this wait
            if not fence:
                ours.send(b"\0")  # left unread in the client end: see _reset
            ours.shutdown(socket.SHUT_RD)  # holders' writes fail (EPIPE): nothing to drain, ever
            self._epoll.register(ours.fileno(), 0)  # EPOLLHUP and EPOLLERR only, always reported
        except BaseException:
            ours.close()
            theirs.close()
            raise
        fd = ours.detach()
        self._ends[fd] = _End(key, ino, uid)
        self._by_key[key] = fd
        return fd, theirs.detach(), key

    def discard(self, key: Key) -> None:
        """Forget a handle just minted whose client end was never sent (the request failed)."""
        fd = self._by_key.get(key)
        if fd is not None:
            self._forget(fd)

    def adopt(self, fd: int, key: Key, ino: int, uid: int) -> None:
        """Watch the broker's end of a handle minted before a restart (from the fd store)."""
        os.set_blocking(fd, False)
        end = socket.socket(fileno=fd)
        try:
            end.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already shut down: the watcher finds out what became of it
        finally:
            end.detach()
        self._epoll.register(fd, 0)
        self._ends[fd] = _End(key, ino, uid)
        self._by_key[key] = fd

    def signal(self, key: Key) -> None:
        """Make every copy of fence ``key`` readable: the byte (see _reset), then end-of-file."""
        fd = self._by_key.get(key)
        if fd is None:
            return
        end = socket.socket(fileno=fd)
        try:
            end.send(b"\0")
            end.shutdown(socket.SHUT_WR)
        except OSError:
            return  # every copy is gone already (EPIPE): its hang-up is reported as it is
        finally:
            end.detach()
        if fd not in self._unsure:
            self._ends[fd].quiet = True
            self._epoll.modify(fd, select.EPOLLET)

    def end_of(self, key: Key) -> int | None:
        """The broker's end of handle ``key`` (for the fd store), if it is still open."""
        return self._by_key.get(key)

    def ino_of(self, key: Key) -> int:
        return self._ends[self._by_key[key]].ino

    async def watch(self) -> None:
        """Run forever, reporting handles as their last copies are closed."""
        next_round = 0.0
        while True:
            with trio.CancelScope() as self._parked:
                if self._unsure:
                    due = min(self._ends[queue[0]].due for queue in self._unsure.values())
                    self._parked.deadline = max(due, next_round)
                await trio.lowlevel.wait_readable(self._epoll.fileno())
            self._parked = None
            try:
                self.settle()
                if self._unsure and trio.current_time() >= next_round:
                    next_round = trio.current_time() + ROUND_GAP
                    await self._look_up()
            except Exception:  # a bug here must not stop the broker: log it, and go on
                log.exception("watching handles failed")
                await trio.sleep(RECHECK)

    def settle(self) -> None:
        """Report every handle the kernel has already seen closed; never waits.

        A hang-up with a reset is a close, reported here; any other is set aside for the
        watcher to look up off the loop.
        """
        for _ in range(_SETTLE_ROUNDS):
            events = self._epoll.poll(0, 256)
            for fd, _flags in events:  # only EPOLLHUP and EPOLLERR are asked for
                end = self._ends[fd]
                if _reset(fd):  # released with our byte unread: closed, no need to ask the kernel
                    self._gone(fd)
                elif end.quiet:  # a signalled fence's own shutdown
                    end.quiet = False
                else:
                    self._epoll.unregister(fd)  # it would be reported for ever: look it up instead
                    end = self._ends[fd]
                    end.due = trio.current_time()
                    self._unsure.setdefault(end.uid, deque()).append(fd)
                    self._wake()
            if len(events) < 256:
                break

    def _wake(self) -> None:
        if self._parked is not None:
            self._parked.deadline = min(self._parked.deadline, trio.current_time())

    def _round(self) -> list[int]:
        """The unsure handles due now, at most LOOKUPS_PER_UID of each uid's (taken off their queues)."""
        now = trio.current_time()
        batch = []
        for uid, queue in list(self._unsure.items()):
            for _ in range(LOOKUPS_PER_UID):
                if not queue or self._ends[queue[0]].due > now:
                    break
                batch.append(queue.popleft())
            if not queue:
                del self._unsure[uid]
        return batch

    async def _look_up(self) -> None:
        """Ask the kernel, in a worker thread, which of the due handles still exist."""
        batch = self._round()
        if not batch:
            return
        asked = [(self._ends[fd].ino, self._ends[fd].key) for fd in batch]
        diag = self._diag
        if diag is None:
            alive: set[Key] = set()
        else:
            try:
                alive = await trio.to_thread.run_sync(_existing, diag, asked)
            except OSError as e:
                log.warning("cannot look up %d handle(s) that hung up, will again: %s", len(batch), e)
                alive = {key for _, key in asked}
        again = trio.current_time() + RECHECK
        for fd in batch:
            end = self._ends.get(fd)
            if end is None:  # gone meanwhile (the table was closed)
                continue
            if end.key in alive:
                end.due = again
                self._unsure.setdefault(end.uid, deque()).append(fd)
            else:
                self._gone(fd, looked_up=True)

    def _gone(self, fd: int, looked_up: bool = False) -> None:
        """Forget the handle of broker end ``fd`` and report it closed; a failure costs it only."""
        key = self._ends[fd].key
        self._forget(fd, looked_up)
        try:
            self._closed(key)
        except Exception:
            log.exception("handle %s closed, but its buffer could not be updated", key)

    def _forget(self, fd: int, off_epoll: bool = False) -> None:
        """Close the broker end ``fd``; ``off_epoll`` if it is no longer watched (looked up)."""
        end = self._ends.pop(fd)
        del self._by_key[end.key]
        if not off_epoll:
            self._epoll.unregister(fd)
        os.close(fd)  # nothing can be queued in it (shut down for reading): a quick close

    def close(self) -> None:
        self._unsure.clear()
        for fd in list(self._ends):
            self._forget(fd, off_epoll=True)  # the epoll instance goes too
        self._epoll.close()
        if self._diag is not None:
            self._diag.close()


def _existing(diag: SocketDiag, asked: Iterable[tuple[int, Key]]) -> set[Key]:
    """The keys of the handles in ``asked`` (client-end inode, cookie) whose sockets still exist."""
    return {key for ino, key in asked if diag.exists(ino, key)}
