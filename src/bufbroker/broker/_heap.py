"""The memfd heap: backing storage as sealed memfds, and adopting a client's own memfd.

Invariants every backing fd keeps before any client sees it:

* sealed F_SEAL_SHRINK | F_SEAL_GROW (| F_SEAL_SEAL for ours), so no peer can truncate it under
  another peer's mapping and make it SIGBUS;
* mode 0400, owned by the broker's uid, so a process of another uid holding a read-only
  descriptor cannot reopen /proc/self/fd/N read-write (memfd inodes are created 0777);
* handed out read-only (reopened O_RDONLY) wherever the holder may not write, so the kernel
  itself refuses a writable mmap.

Processes of the broker's own uid are not held back by any of this (they could ptrace it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from ..protocol import PAGE_SIZE, BrokerError

__all__ = ["HEAPS", "Backing", "adopt_memfd", "allocate_memfd", "check_memfd", "seal_snapshot"]

F_SEAL_FUTURE_WRITE = 0x10  # linux/fcntl.h; Python has no constant for it
_OURS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

HEAPS = ("memfd",)


class Backing:
    """One buffer's storage: a memfd the broker keeps open for as long as the buffer lives."""

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def descriptors(self, writable: bool) -> list[int]:
        """New descriptors for one client; the caller closes them once they are sent."""
        if writable:
            return [os.dup(self.fd)]
        return [os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def allocate_memfd(size: int, label: str) -> Backing:
    fd = os.memfd_create(f"bufbroker:{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.fchmod(fd, 0o400)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _OURS)
    except OSError as e:
        os.close(fd)
        raise BrokerError(e.errno or errno.ENOMEM, f"cannot create backing memory: {e.strerror}") from None
    return Backing(fd, size)


def adopt_memfd(fd: int) -> Backing:
    """Take a client's memfd as a buffer's backing, under udmabuf's rules (udmabuf_create).

    On success the Backing owns ``fd``; on error the caller still does.
    """
    return Backing(fd, check_memfd(fd))


def check_memfd(fd: int) -> int:
    """``fd``'s size, once it passes udmabuf's rules and is made safe to hand out (below).

    Also the check of every memfd an exporter answers a map with. The caller keeps ``fd``.
    F_GET_SEALS comes first: it fails at once for anything but shmem, so nothing below can be
    made to wait (an fstat of a FUSE file could).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        raise BrokerError(errno.EBADFD, "not a memfd: its seals cannot be read") from None
    if not target.startswith("/memfd:"):
        raise BrokerError(errno.EBADFD, f"not a memfd: {target}")
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
        # Without F_SEAL_GROW the memfd could grow past the size it was charged for.
        raise BrokerError(errno.EINVAL, "the memfd must be sealed F_SEAL_SHRINK and F_SEAL_GROW")
    if seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise BrokerError(errno.EINVAL, "the memfd must not be sealed against writing")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise BrokerError(errno.EACCES, "the memfd must be open read-write")
    st = os.fstat(fd)
    if st.st_blksize > PAGE_SIZE:
        # A hole punched in a hugetlb memfd SIGBUSes every reader; shmem refills holes with zeros.
        raise BrokerError(errno.EINVAL, "hugetlb memfds cannot be exported (a hole would SIGBUS readers)")
    size = st.st_size
    if size == 0 or size % PAGE_SIZE:
        raise BrokerError(errno.EINVAL, f"the memfd's size must be a non-zero multiple of {PAGE_SIZE}")
    # Read-only handles must stay read-only for other uids, who could otherwise reopen the
    # memfd for writing through /proc/self/fd. Only its owner (or root) may chmod it; where
    # the broker cannot, a memfd that group or others may write is refused (before any seal
    # is added: a refused memfd is left as it came).
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o400)
    if os.fstat(fd).st_mode & 0o022:
        raise BrokerError(
            errno.EACCES,
            "group or others may write the memfd, and the broker cannot change its mode: "
            "take their write permission off first (fchmod 0600)",
        )
    return size


def seal_snapshot(data: bytes) -> int:
    """A memfd holding ``data``, sealed against every change (for the fd store)."""
    fd = os.memfd_create("bufbroker:snapshot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
        )
    except OSError:
        os.close(fd)
        raise
    return fd
