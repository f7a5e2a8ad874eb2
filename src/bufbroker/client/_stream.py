"""Streams on the client side, written once: the pool, the ring, and who waits for what.

A publisher maps the pool read-write and signals the frame timeline; each subscriber maps it
read-only, waits on the frame timeline and signals its own release timeline with the last
frame it gave back (frames are given back in order: one held longer holds back the ones
after it). Before each loan the publisher looks at the control page's ``members`` word, and
only when it changed asks the broker who subscribes now; the loan then waits until every
subscriber that received the frame the slot last held has given it back. A subscriber whose
release timeline fails (it left or died: the broker fails it with ESRCH) is waited for no
more. The blocking (``_sync_stream``) and trio (``_trio_stream``) faces only wait.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import time

from .. import protocol as p
from ..protocol import BrokerError
from ..protocol import stream as ring
from ..protocol import timeline as page
from ._timeline import View, Views

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["FrameBase", "LoanBase", "Pool", "PublisherCore", "SubscriberCore"]


class Pool:
    """This process's mapping of a stream's pool: the control page and the slots."""

    def __init__(self, result: dict[str, Any], fd: int, writable: bool) -> None:
        try:
            length = result["offset"] + result["slots"] * result["stride"]
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map = mmap.mmap(fd, length, prot=prot)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self.words: ring.Control = self._view[: ring.PAGE_BYTES].cast("Q")
        self.slots, self.size, self.stride = ring.check(self.words)
        self._offset = result["offset"]

    def slot(self, index: int, length: int) -> memoryview:
        start = self._offset + index * self.stride
        return self._view[start : start + length]

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view a caller kept holds the mapping
            self.words.release()
            self._view.release()
            self._map.close()


def _signal(view: View, point: int, now_ns: int) -> None:
    """Advance a timeline this process signals (its page is mapped read-write here), and wake."""
    page.signal(view.slots, point, 0, now_ns)
    page.kick(view.eventfd)


class _Member:
    __slots__ = ("start", "view")

    def __init__(self, view: View, start: int) -> None:
        self.view = view
        self.start = start


class PublisherCore:
    """The publisher's ring: which slot comes next, and whom a loan must wait for."""

    def __init__(self, views: Views, result: dict[str, Any], fds: Sequence[int]) -> None:
        self._views = views
        self.id: int = result["stream"]
        self.name: str = result["name"]
        self.pool = Pool(result, fds[0], True)
        self.frames = views.take(result["frames"], fds[1:3])
        self.size, self.slots = self.pool.size, self.pool.slots
        self.seq = page.value(self.frames.slots) + 1  # the next frame's number
        self._members: dict[int, _Member] = {}  # by subscriber id
        self._seen = ring.members(self.pool.words)
        self.loaned = False
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._members)

    def stale(self) -> bool:
        """Whether someone joined or left since the broker was last asked."""
        return ring.members(self.pool.words) != self._seen

    def invalidate(self) -> None:
        """Ask the broker again before the next loan (an answer was lost to cancellation)."""
        self._seen = -1

    def members_request(self) -> p.StreamMembers:
        self._seen = ring.members(self.pool.words)  # read first: a change meanwhile is seen next time
        have = tuple(m.view.id for m in self._members.values())
        return p.StreamMembers(stream=self.id, have=have)

    def apply_members(self, result: dict[str, Any], fds: list[int]) -> bool:
        """Take the broker's list of subscribers; True if it has more release pages to send."""
        fresh = {}
        try:
            for i, desc in enumerate(result["timelines"]):
                fresh[desc["id"]] = self._views.take(desc, fds[2 * i : 2 * i + 2])
        except BaseException:
            p.close_all(fds[2 * len(fresh) :])
            for view in fresh.values():
                self._views.drop(view)
            raise
        listed = {}
        for sub_id, start, timeline_id in result["subscribers"]:
            member = self._members.pop(sub_id, None)
            if member is None:
                if timeline_id not in fresh:
                    continue  # its page comes in the next part
                member = _Member(fresh.pop(timeline_id), start)
            listed[sub_id] = member
        for gone in self._members.values():
            self._views.drop(gone.view)
        for unused in fresh.values():
            self._views.drop(unused)
        self._members = listed
        return bool(result["more"])

    def pending(self) -> list[View]:
        """The release timelines the next loan waits for; subscribers that failed are dropped."""
        old = self.seq - self.slots  # the frame the next slot last held
        if old < 1:
            return []
        waiting = []
        for sub_id, member in list(self._members.items()):
            if member.start > old:
                continue
            status = member.view.status(old)
            if status < 0:
                del self._members[sub_id]
                self._views.drop(member.view)
            elif status == 0:
                waiting.append(member.view)
        return waiting

    def reserve(self) -> None:
        """Claim the one loan (EBUSY if taken); whoever claims it gives it up if it makes no Loan."""
        if self.closed:
            raise BrokerError(errno.EBADF, f"stream {self.name!r} is closed")
        if self.loaned:
            raise BrokerError(errno.EBUSY, f"a frame of stream {self.name!r} is already on loan")
        self.loaned = True

    def timed_out(self, timeout: float | None) -> BrokerError:
        return BrokerError(
            errno.ETIME, f"no slot of stream {self.name!r} was given back within {timeout} s"
        )

    def send(self, slot: int, seq: int, nbytes: int) -> None:
        if not 0 <= nbytes <= self.size:
            raise BrokerError(errno.EINVAL, f"a frame of stream {self.name!r} holds 0 to {self.size} bytes")
        now = time.monotonic_ns()
        ring.write_header(self.pool.words, slot, seq, nbytes, now)
        _signal(self.frames, seq, now)
        self.seq = seq + 1

    def close_local(self) -> None:
        if not self.closed:
            self.closed = True
            for member in self._members.values():
                self._views.drop(member.view)
            self._members.clear()
            self._views.drop(self.frames)
            self.pool.close()


class LoanBase:
    """A slot on loan: fill ``memory``, then ``send(nbytes)``; given back unsent, it is discarded."""

    def __init__(self, core: PublisherCore) -> None:
        core.loaned = True
        self._core = core
        self.seq = core.seq
        self._slot = ring.slot_of(self.seq, core.slots)
        self.memory = core.pool.slot(self._slot, core.size)
        self.sent = False

    def send(self, nbytes: int) -> None:
        """Publish the first ``nbytes`` of ``memory`` as the next frame (no broker message)."""
        if self.sent or not self._core.loaned:
            raise BrokerError(errno.EINVAL, "this frame was already sent or given back")
        self._core.send(self._slot, self.seq, nbytes)
        self._finish()
        self.sent = True

    def _finish(self) -> None:
        if self._core.loaned:
            self._core.loaned = False
            with contextlib.suppress(BufferError):
                self.memory.release()


class SubscriberCore:
    """A subscriber's place in the ring: the next frame, and which ones it still holds."""

    def __init__(self, views: Views, result: dict[str, Any], fds: Sequence[int]) -> None:
        self._views = views
        self.id: int = result["subscriber"]
        self.stream: int = result["stream"]
        self.name: str = result["name"]
        self.pool = Pool(result, fds[0], False)
        self.frames = views.take(result["frames"], fds[1:3])
        self.release = views.take(result["release"], fds[3:5])
        self.next: int = result["start"]
        self._released = self.next - 1
        self._held: set[int] = set()
        self.closed = False

    def status(self) -> int:
        """The next frame's point: 1 sent, 0 not yet, ``-errno`` if the stream failed before it."""
        if self.closed:
            raise BrokerError(errno.EBADF, f"the subscription to {self.name!r} is closed")
        return page.point_status(self.frames.slots, self.next)

    def failed(self, status: int) -> BrokerError:
        if status == -errno.ESRCH:
            return BrokerError(errno.ESRCH, f"stream {self.name!r} ended: its publisher is gone")
        return BrokerError(-status, f"stream {self.name!r} failed before frame {self.next}")

    def timed_out(self, timeout: float | None) -> BrokerError:
        return BrokerError(
            errno.ETIME, f"frame {self.next} of stream {self.name!r} did not come within {timeout} s"
        )

    def take(self) -> tuple[int, int, int, memoryview]:
        """The next frame, its timeline point reached: (seq, size, timestamp, memory)."""
        seq = self.next
        slot = ring.slot_of(seq, self.pool.slots)
        got, size, stamp = ring.frame_header(self.pool.words, slot)
        if got != seq or size > self.pool.size:
            raise BrokerError(
                errno.EPROTO, f"slot {slot} of stream {self.name!r} holds frame {got}, not {seq}"
            )
        self.next = seq + 1
        self._held.add(seq)
        return seq, size, stamp, self.pool.slot(slot, size)

    def give_back(self, seq: int) -> None:
        """Frame ``seq`` is done with; signal the release timeline up to the oldest still held."""
        self._held.discard(seq)
        upto = min(self._held) - 1 if self._held else self.next - 1
        if upto > self._released and not self.closed:
            self._released = upto
            _signal(self.release, upto, time.monotonic_ns())

    def close_local(self) -> None:
        if not self.closed:
            self.closed = True
            self._views.drop(self.frames)
            self._views.drop(self.release)
            self.pool.close()


class FrameBase:
    """A received frame: ``memory`` (read-only, ``size`` bytes), ``seq``, ``size``, ``timestamp``.

    ``timestamp`` is CLOCK_MONOTONIC nanoseconds when the publisher sent it (comparable
    across processes). Leaving its block gives the slot back.
    """

    def __init__(self, core: SubscriberCore) -> None:
        self._core = core
        self.seq, self.size, self.timestamp, self.memory = core.take()
        self.done = False

    def release(self) -> None:
        """Give the slot back (the block's exit does it)."""
        if not self.done:
            self.done = True
            with contextlib.suppress(BufferError):
                self.memory.release()
            self._core.give_back(self.seq)

    def __repr__(self) -> str:
        return f"<Frame {self.seq} of {self._core.name!r}: {self.size} bytes>"
