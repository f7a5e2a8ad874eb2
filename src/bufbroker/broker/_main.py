"""``bufbrokerd``: parse flags, bind (or refuse to steal) the socket, serve until a signal."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import trio

from .. import __version__
from .._paths import default_socket_path
from ..protocol import close_all
from ._config import Config, add_arguments, from_arguments, load_toml
from ._fdstore import is_stored
from ._server import Server
from ._systemd import JournalFormatter, ServiceManager, journal_stream, listen_fds, raise_nofile_limit

__all__ = ["main"]

log = logging.getLogger("bufbroker.broker")

DEFAULT_CONFIG = Path("/etc/bufbroker/bufbroker.toml")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def _mode(text: str) -> int:
    """``--socket-mode``: an octal file mode, as chmod takes it."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r} (e.g. 0660, 0666)")
    return mode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bufbrokerd", description="The bufbroker daemon: shares dma-buf-like buffers between processes."
    )
    parser.add_argument(
        "--socket", metavar="PATH", help=f"socket to listen on [default: {default_socket_path()}]"
    )
    parser.add_argument(
        "--socket-mode",
        metavar="MODE",
        type=_mode,
        default=0o666,
        help="permissions of a socket file the daemon creates [default: 0666]",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help=f"TOML file of limits [default: {DEFAULT_CONFIG} if present]",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"bufbrokerd {__version__}")
    add_arguments(parser)
    return parser


def _claim(path: str) -> None:
    """Make room for our socket: refuse a live broker's socket, replace a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing stale socket %s", path)
        os.unlink(path)
    except OSError as e:
        raise StartupError(f"cannot probe {path}: {e.strerror}") from None
    else:
        raise StartupError(f"another broker is already serving {path}")
    finally:
        probe.close()


@contextlib.contextmanager
def _listening(path: str, mode: int) -> Iterator[trio.socket.SocketType]:
    """A bound, listening socket at ``path``, removed again on the way out if still ours."""
    _claim(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        raise StartupError(
            f"cannot create {directory}: {e.strerror}; "
            "choose a socket with --socket PATH or $BUFBROKER_SOCKET"
        ) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    ours = -1
    try:
        sock.bind(path)
        ours = os.stat(path).st_ino
        os.chmod(path, mode)
        sock.listen(128)
        yield trio.socket.from_stdlib_socket(sock)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EROFS):
            raise StartupError(f"cannot listen on {path}: {e.strerror}") from None
        raise
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ours:
                os.unlink(path)


@contextlib.contextmanager
def _activated(fd: int) -> Iterator[trio.socket.SocketType]:
    """A listening socket the service manager made for us (socket activation); not ours to unlink."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.close()
        raise StartupError("the activation socket must be AF_UNIX SOCK_SEQPACKET (ListenSequentialPacket=)")
    try:
        yield trio.socket.from_stdlib_socket(sock)
    finally:
        sock.close()


def _status(server: Server) -> str:
    state = server.state
    return (
        f"{len(state.buffers)} buffers, {state.quotas.total_bytes} bytes, "
        f"{len(state.devices)} devices, {len(server.handles)} handles"
    )


def _nothing_stored(fdstore_max: int | None) -> str:
    """What to say when a manager started us with an empty fd store."""
    if fdstore_max:  # the manager says it has a store: this is a first start
        return f"the file descriptor store (room for {fdstore_max}) is empty: no buffers to restore"
    # The broker stores a snapshot at every start, so a restart with a working store always
    # gets one back. Nothing came back: a first start, or a manager that keeps nothing.
    return (
        "the service manager handed back no stored buffers: if this is a restart, the buffers "
        "of the previous broker were not kept (the unit needs FileDescriptorStoreMax=)"
    )


def _what_is_kept(server: Server, manager: ServiceManager) -> tuple[int, str] | None:
    """The log line (level, text) that says, at a stop, which buffers outlive the broker."""
    buffers = list(server.state.buffers.values())
    if not buffers:
        return None
    total = sum(b.size for b in buffers)
    what = f"{len(buffers)} buffers ({total} bytes)"
    if not manager.present:
        return logging.WARNING, (
            f"stopping with {what}: they are not kept, there is no service manager with a "
            "file descriptor store; they are freed as the broker exits"
        )
    kept = sum(1 for b in buffers if b.handles)
    text = f"stopping with {what}: {kept} held by handles stay in the service manager's file descriptor store"
    text += " for a restart"
    if manager.fdstore_max is None:  # systemd before 254 does not say whether it has a store
        text += ", if the unit sets FileDescriptorStoreMax="
    if kept < len(buffers):
        text += f"; {len(buffers) - kept} held only by devices are freed"
    return logging.INFO, text


async def _tell_manager(manager: ServiceManager, server: Server) -> None:
    """STATUS= when it changes (looked at once a second), WATCHDOG=1 every half of WATCHDOG_USEC."""
    period = manager.watchdog_period()
    last = ""
    next_status = next_ping = trio.current_time()
    while True:
        now = trio.current_time()
        if now >= next_status:
            text = _status(server)
            if text != last:
                manager.status(text)
                last = text
            next_status = now + 1.0
        if period is not None and now >= next_ping:
            manager.watchdog_ping()
            next_ping = now + period
        await trio.sleep_until(next_status if period is None else min(next_status, next_ping))


async def _run(
    config: Config,
    path: str,
    mode: int,
    manager: ServiceManager,
    inherited: list[tuple[int, str]],
) -> None:
    stored = [(fd, name) for fd, name in inherited if is_stored(name)]
    sockets = [fd for fd, name in inherited if not is_stored(name)]
    if manager.present:
        if not stored:
            log.info("%s", _nothing_stored(manager.fdstore_max))
        server = Server(config, version=__version__, fdstore=manager, stored=stored)
    else:
        log.info("no service manager: buffers are not kept across a restart of the broker")
        if stored:
            log.warning(
                "dropping %d descriptors of a file descriptor store: without a service manager "
                "(no $NOTIFY_SOCKET) their buffers are not kept",
                len(stored),
            )
        close_all(fd for fd, _ in stored)
        server = Server(config, version=__version__)
    close_all(sockets[1:])
    listening = _activated(sockets[0]) if sockets else _listening(path, mode)
    with listening as listener, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            where = "the activation socket" if sockets else path
            log.info("bufbrokerd %s listening on %s (pid %d)", __version__, where, os.getpid())
            manager.ready(_status(server))
            nursery.start_soon(_tell_manager, manager, server)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                if farewell := _what_is_kept(server, manager):
                    log.log(*farewell)
                manager.stopping()
                await server.announce_shutdown()
                nursery.cancel_scope.cancel()
                break


def _logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if journal_stream():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("bufbrokerd: %(levelname)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging(args.log_level)
    manager = ServiceManager()
    inherited = listen_fds()
    try:
        config_file = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        config = from_arguments(args, load_toml(config_file) if config_file else None)
        limit = raise_nofile_limit()
        log.debug("descriptor limit raised to %d", limit)
        trio.run(_run, config, args.socket or default_socket_path(), args.socket_mode, manager, inherited)
    except (StartupError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        manager.close()
    return 0
