"""Handles: socketpair ends whose last close, anywhere, the kernel reports to the broker.

The broker keeps one end of each pair and sends the other (it never keeps a copy of the
client end). When every copy of the client end is closed, in any process or still in flight
inside some Unix socket, the kernel gives the broker's end EPOLLHUP: the handle is gone.

Thousands of handles are watched through one epoll instance that trio waits on as a single
readable descriptor, instead of a task parked on each handle (a parked task costs ~2.8 KB).
Anything a holder writes into its handle is read and thrown away, descriptors included, so a
handle sent into itself cannot keep itself alive.

The kernel frees a dma-buf as its last fd is closed; here the news arrives a little later, when
the watcher runs. ``settle`` takes what the kernel has already reported, so that a request sent
after a close (an allocate at the quota, an open of a name just let go, a listing) sees it.

A holder that calls ``shutdown()`` on its copy shuts the broker's end down too, exactly as the
last close would. So every hang-up is checked against the kernel's socket table (sock_diag):
a client end that still exists was only shut down, and the handle lives on. Its end then stays
readable for ever, so it leaves the epoll set and is looked up again every RECHECK seconds.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import time
from collections.abc import Callable

import trio

from ._records import Key
from ._sockdiag import SocketDiag

__all__ = ["RECHECK", "HandleTable", "handle_key"]

log = logging.getLogger("bufbroker.broker")

RECHECK = 1.0  # seconds between lookups of handles that a holder shut down

_CLOSED = select.EPOLLHUP | select.EPOLLRDHUP | select.EPOLLERR
_DRAIN_PACKETS = 64  # per wake-up, so one chatty holder cannot starve the others
_SETTLE_ROUNDS = 64  # of 256 events: a bound, in case holders write without end


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


def handle_key(fd: int) -> Key:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class HandleTable:
    def __init__(self, closed: Callable[[Key], None]) -> None:
        """``closed(key)`` is called for each handle whose last copy was closed."""
        self._closed = closed
        self._epoll = select.epoll()
        self._ends: dict[int, Key] = {}  # by broker-end fd (a bare int: a socket object is 100 bytes)
        self._by_key: dict[Key, int] = {}
        self._shut: set[int] = set()  # broker-end fds of handles shut down, not closed: off epoll
        self._checked = 0.0  # when the shut-down handles were last looked up
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

    def mint(self, *, mark: bool = True) -> tuple[int, Key]:
        """A new handle: returns the client end's fd (the caller sends, then closes it).

        Without ``mark`` (a fence, whose client end must read nothing until it is signalled)
        no byte is queued, and every last close is confirmed through the socket table.
        """
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            key = handle_key(theirs.fileno())
            if mark:
                ours.send(b"\0")  # left unread in the client end: see _reset
            self._epoll.register(ours.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        fd = ours.detach()
        self._ends[fd] = key
        self._by_key[key] = fd
        return theirs.detach(), key

    def adopt(self, fd: int, key: Key) -> None:
        """Watch the broker's end of a handle minted before a restart (from the fd store)."""
        os.set_blocking(fd, False)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._ends[fd] = key
        self._by_key[key] = fd

    def end_of(self, key: Key) -> int | None:
        """The broker's end of handle ``key`` (for the fd store), if it is still open."""
        return self._by_key.get(key)

    async def watch(self) -> None:
        """Run forever, reporting handles as their last copies are closed."""
        while True:
            with trio.CancelScope() as self._parked:
                if self._shut:
                    self._parked.deadline = trio.current_time() + RECHECK
                await trio.lowlevel.wait_readable(self._epoll.fileno())
            self._parked = None
            try:
                self.settle()
            except Exception:  # a bug here must not stop the broker: log it, and go on
                log.exception("watching handles failed")
                await trio.sleep(RECHECK)

    def settle(self) -> None:
        """Report every handle the kernel has already seen closed; never waits."""
        for _ in range(_SETTLE_ROUNDS):
            events = self._epoll.poll(0, 256)
            hung: list[int] = []
            for fd, flags in events:
                if flags & _CLOSED:
                    hung.append(fd)
                else:
                    self._drain(fd, _DRAIN_PACKETS)
            if hung:  # each round's at once: off the epoll set before the next round
                self._hung_up(hung)
            if len(events) < 256:
                break
        if self._shut and time.monotonic() - self._checked >= RECHECK:
            self._checked = time.monotonic()
            self._hung_up(list(self._shut))

    def _drain(self, fd: int, most: int) -> None:
        """Read and drop what holders wrote into a handle, descriptors included."""
        for _ in range(most):
            try:
                if not os.read(fd, 1):  # one packet, whatever its size; SCM_RIGHTS are discarded
                    return
            except OSError:
                return

    def _hung_up(self, fds: list[int]) -> None:
        """These broker ends were shut down: by the last close, or by a holder."""
        unsure = []
        for fd in fds:
            if _reset(fd):  # released with our byte unread: closed, no need to ask the kernel
                self._gone(fd, self._ends[fd])
                continue
            # Descriptors queued in the broker's end (a handle sent into itself) would keep the
            # client end alive: drop them first. Nothing new comes once the end is shut down.
            self._drain(fd, 1 << 16)
            unsure.append(fd)
        if not unsure:
            return
        keys = {fd: self._ends[fd] for fd in unsure}
        try:
            alive = self._diag.existing({ino for _, ino in keys.values()}) if self._diag else set()
        except OSError as e:
            log.warning("cannot look up %d handle(s) that hung up, will again: %s", len(fds), e)
            alive = {ino for _, ino in keys.values()}
        for fd, key in keys.items():
            if key[1] in alive:
                if fd not in self._shut:  # it would be reported for ever: look again later
                    self._epoll.unregister(fd)
                    self._shut.add(fd)
                    if self._parked is not None and self._parked.deadline == math.inf:
                        self._parked.deadline = trio.current_time() + RECHECK  # wake to look
            else:
                self._gone(fd, key)

    def _gone(self, fd: int, key: Key) -> None:
        """Forget handle ``key`` and report it closed; a failure costs this handle only."""
        self._forget(fd)
        try:
            self._closed(key)
        except Exception:
            log.exception("handle %s closed, but its buffer could not be updated", key)

    def _forget(self, fd: int) -> None:
        key = self._ends.pop(fd)
        del self._by_key[key]
        if fd in self._shut:
            self._shut.discard(fd)
        else:
            self._epoll.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        for fd in list(self._ends):
            self._forget(fd)
        self._epoll.close()
        if self._diag is not None:
            self._diag.close()
