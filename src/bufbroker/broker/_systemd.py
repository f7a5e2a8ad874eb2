"""systemd glue in one small module: readiness, status, watchdog, fd store, socket activation.

It speaks the documented protocols directly (sd_notify(3), sd_listen_fds(3)): a datagram of
``KEY=VALUE`` lines to $NOTIFY_SOCKET (a path, or ``@name`` for an abstract address), and
inherited descriptors from 3 on, described by $LISTEN_FDS, $LISTEN_PID and $LISTEN_FDNAMES.
Outside a service manager every call is a no-op, so the daemon runs the same by hand.
"""

from __future__ import annotations

import array
import logging
import os
import resource
import socket
import sys
from collections.abc import Sequence

__all__ = ["JournalFormatter", "ServiceManager", "journal_stream", "listen_fds", "raise_nofile_limit"]

SD_LISTEN_FDS_START = 3
SEND_TIMEOUT = 2.0

log = logging.getLogger("bufbroker.broker")


class ServiceManager:
    """Talks to the manager that started us, if any (``NOTIFY_SOCKET`` is set)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A manager that stops reading must not freeze the broker (these calls come from
            # the trio thread); a notification that cannot be sent in time is logged and lost.
            self._sock.settimeout(SEND_TIMEOUT)
        self._watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid and int(watchdog_pid) != os.getpid():
            self._watchdog_usec = 0  # the watchdog is meant for another process
        fdstore = env.get("FDSTORE", "")
        self._fdstore_max = int(fdstore) if fdstore.isdigit() and self._address else None

    @property
    def present(self) -> bool:
        """Whether a manager listens: only then does FDSTORE keep anything."""
        return self._sock is not None

    @property
    def fdstore_max(self) -> int | None:
        """The size of the manager's fd store, when the manager says so, else None.

        systemd 254 and later set $FDSTORE to FileDescriptorStoreMax= when it is not 0; older
        managers (systemd 252 here) never say, so None means "unknown", not "no store".
        """
        return self._fdstore_max

    def notify(self, *fields: str, fds: Sequence[int] = ()) -> None:
        if self._sock is None:
            return
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self._sock.sendmsg(["\n".join(fields).encode()], ancillary, 0, self._address)
        except OSError as e:
            log.warning("cannot notify the service manager (%s): %s", e, " ".join(fields))

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog_period(self) -> float | None:
        """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec and self.present else None

    def watchdog_ping(self) -> None:
        self.notify("WATCHDOG=1")

    def fdstore(self, fds: Sequence[int], name: str) -> None:
        """Keep ``fds`` in the manager's fd store under ``name`` (we keep our own copies).

        FDPOLL=0: systemd would otherwise drop a stored descriptor on EPOLLHUP, which a
        handle's broker end also shows when a holder merely calls shutdown() on its copy; the
        broker removes what it no longer needs itself.
        """
        self.notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=fds)

    def fdstore_remove(self, name: str) -> None:
        self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds() -> list[tuple[int, str]]:
    """The descriptors the manager passed us, with their names (sd_listen_fds_with_names).

    Only if LISTEN_PID is our pid: the variables may have been inherited from a parent. The
    descriptors are made close-on-exec, and the variables unset so children do not see them.
    """
    env = os.environ
    pid, count, names = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", ""), env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    labels += ["unknown"] * (len(fds) - len(labels))
    for fd in fds:
        os.set_inheritable(fd, False)
    return list(zip(fds, labels, strict=False))


def journal_stream() -> bool:
    """Whether stderr is connected to the journal ($JOURNAL_STREAM names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Prefixes each line with ``<N>``, its syslog priority, which journald reads (sd-daemon(3))."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each buffer costs descriptors).

    Returns the soft limit in force afterwards; a sandbox that forbids the change is not fatal.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
            return soft
    return hard
