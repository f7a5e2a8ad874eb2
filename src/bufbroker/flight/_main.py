"""``bufbroker-flight``: the Flight service of one host, in front of its broker.

Prints one line, ``listening on LOCATION`` (with the port the kernel chose for port 0), once
it accepts calls; SIGTERM or Ctrl-C stops it, and it lets go of every buffer it received.
gRPC's shutdown waits for every call to finish, and a client that stops reading never lets a
fetch finish: after ``--grace`` seconds the process exits anyway, and the kernel closes its
broker connections, which releases whatever those transfers held.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from urllib.parse import urlsplit

from ..protocol import BrokerError
from . import _wire as wire
from ._policy import Policy
from ._server import FlightService

__all__ = ["main"]

TOKEN_ENV = "BUFBROKER_FLIGHT_TOKEN"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bufbroker-flight",
        description="Serve the local broker's named buffers to other hosts over Arrow Flight.",
    )
    parser.add_argument(
        "--listen",
        required=True,
        metavar="grpc://HOST:PORT",
        help="where to listen: grpc://, grpc+tcp:// or grpc+tls:// (port 0: any free port)",
    )
    parser.add_argument(
        "--socket", metavar="PATH", help="the local broker's socket (default: as for bufbroker)"
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="GLOB",
        help="names remotes may list, fetch and push (repeatable; default: none)",
    )
    parser.add_argument(
        "--allow-read",
        action="append",
        default=[],
        metavar="GLOB",
        help="names remotes may only list and fetch (repeatable)",
    )
    parser.add_argument(
        "--allow-write",
        action="append",
        default=[],
        metavar="GLOB",
        help="names remotes may only push (repeatable)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"require this bearer token (first line of the file; or ${TOKEN_ENV})",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate chain for grpc+tls://")
    parser.add_argument("--tls-key", metavar="PEM", help="private key for grpc+tls://")
    parser.add_argument(
        "--chunk",
        type=int,
        default=wire.CHUNK,
        metavar="BYTES",
        help=f"bytes per message when serving (default {wire.CHUNK})",
    )
    parser.add_argument(
        "--max-transfers",
        type=int,
        default=16,
        metavar="N",
        help="transfers at once; more are refused with EAGAIN (default 16)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="at shutdown, how long transfers in flight may take to finish (default 5)",
    )
    return parser


def _token(path: str | None) -> str | None:
    if path is not None:
        with open(path) as f:
            return f.readline().strip()
    return os.environ.get(TOKEN_ENV) or None


def _service(args: argparse.Namespace) -> FlightService:
    where = urlsplit(args.listen)
    if where.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not where.hostname or where.port is None:
        raise ValueError(f"--listen wants grpc://HOST:PORT (or grpc+tls://), not {args.listen!r}")
    certificates = []
    if where.scheme == "grpc+tls":
        if not (args.tls_cert and args.tls_key):
            raise ValueError("grpc+tls:// needs --tls-cert and --tls-key")
        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            certificates.append((cert.read(), key.read()))
    elif args.tls_cert or args.tls_key:
        raise ValueError("--tls-cert and --tls-key need a grpc+tls:// address")
    if args.chunk <= 0 or args.max_transfers <= 0 or args.grace < 0:
        raise ValueError("--chunk and --max-transfers must be positive, --grace not negative")
    return FlightService(
        args.listen,
        policy=Policy(read=(*args.allow, *args.allow_read), write=(*args.allow, *args.allow_write)),
        socket=args.socket,
        token=_token(args.token_file),
        tls_certificates=certificates,
        chunk=args.chunk,
        max_transfers=args.max_transfers,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        service = _service(args)
    except (OSError, ValueError, BrokerError) as e:
        print(f"bufbroker-flight: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    where = urlsplit(args.listen)
    print(f"listening on {where.scheme}://{where.hostname}:{service.port}", flush=True)
    if not (args.allow or args.allow_read or args.allow_write):
        print("bufbroker-flight: no --allow given: nothing is served or accepted", file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        stopping = threading.Thread(target=service.shutdown, daemon=True)
        stopping.start()
        stopping.join(args.grace)
        service.close_kept()
    if stopping.is_alive():
        print(
            f"bufbroker-flight: transfers still running after {args.grace:g} s: left to the kernel",
            file=sys.stderr,
        )
        sys.stderr.flush()
        os._exit(0)  # past gRPC's wait for them; the interpreter's own exit would wait too
    return 0
