"""`infergate gateway`: the data plane, discovery and the admin API."""
from __future__ import annotations

import ipaddress
import logging
import os

from ..auth import SHARED_CAPACITY
from .errors import NO_RUNTIME, CliError, has_model_runtime

DEFAULT_STATE_DIR = os.path.join(os.path.expanduser("~"), ".infergate")


def register(sub) -> None:
    p = sub.add_parser("gateway", help="serve the gateway",
                       description="Serve /api/predict/<service> and the Open Inference "
                                   "Protocol (/v2/models/<service>, and gRPC with --grpc-port), "
                                   "endpoint discovery, /metrics and the admin API.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int,
                   help="also serve the Open Inference Protocol over gRPC on this port "
                        "(default: no gRPC)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", default=os.environ.get("INFERGATE_STATE_DIR"),
                       help=f"embedded state store directory (default {DEFAULT_STATE_DIR})")
    where.add_argument("--registry", default=os.environ.get("INFERGATE_REGISTRY"),
                       help="share state through Redis: redis://HOST:PORT/DB")
    p.add_argument("--admin-token", default=os.environ.get("INFERGATE_ADMIN_TOKEN", ""),
                   help="token the admin API requires (env INFERGATE_ADMIN_TOKEN)")
    p.add_argument("--processes", type=int, default=1,
                   help="serve from N processes on one port (SO_REUSEPORT)")
    p.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between active health checks of each instance")
    p.add_argument("--max-body-mb", type=int, default=64)
    p.add_argument("--max-response-mb", type=int, default=256,
                   help="an instance's answer at most (the gateway buffers it whole); past it "
                        "the client gets a 502")
    p.add_argument("--max-buffered-body-mb", type=int, default=1024,
                   help="request bodies being received, all clients together, at most (each "
                        "is buffered whole); a request that would pass it gets a 503")
    p.add_argument("--max-connections", type=int,
                   help="client connections at most; past it a new one replaces the slowest "
                        "idle or unfinished one (default: from the descriptor limit, "
                        "ulimit -n, less a quarter for upstreams)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request may take to arrive whole, over HTTP/1.1 and gRPC "
                        "(then 408, or DEADLINE_EXCEEDED), and a gRPC answer to be read")
    p.add_argument("--idle-timeout", type=float, default=75.0,
                   help="seconds a client connection may stay without a request")
    p.add_argument("--open-discovery", action="store_true",
                   help="list every service's instances to anyone; by default a service with "
                        "a token lists them only to requests that carry it. The unchanged "
                        "eas-prediction SDK sends no token when it discovers (direct mode)")
    p.add_argument("--replay-memory", type=int, default=SHARED_CAPACITY, metavar="N",
                   help="EAS signatures remembered against replays per service token and per "
                        "caller token, in the state store, until their Dates expire (14 h); "
                        "past N that token's signed requests get 401 until some expire "
                        f"(default {SHARED_CAPACITY:,})")
    p.add_argument("--access-log", metavar="PATH",
                   help="write one JSON line per answered request to PATH (default: none)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args) -> int:
    from ..server.runner import configure_logging, run as run_app

    if not args.admin_token and not _is_loopback(args.host):
        # The admin API starts processes and registers instances: never open to a network.
        raise CliError(f"--admin-token (or INFERGATE_ADMIN_TOKEN) is required when serving on "
                       f"{args.host}, which is not a loopback address")
    from ..registry import is_redis_url

    if args.registry and not is_redis_url(args.registry):
        raise CliError(f"--registry must be a Redis URL (redis://, rediss://, redis+cluster://), "
                       f"got {args.registry!r}; use --state-dir for the embedded store")
    if args.state_dir and os.path.exists(args.state_dir) and not os.path.isdir(args.state_dir):
        raise CliError(f"--state-dir {args.state_dir!r} exists and is not a directory")
    if args.replay_memory < 1:
        raise CliError(f"--replay-memory must be at least 1, got {args.replay_memory}")
    for flag, port in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if port is not None and not 0 < port < 65536:
            raise CliError(f"{flag} must be from 1 to 65535, got {port}")
    for flag, seconds in (("--read-timeout", args.read_timeout),
                          ("--idle-timeout", args.idle_timeout)):
        if not 0 < seconds <= 3600:
            raise CliError(f"{flag} must be more than 0 and at most 3600 seconds, got {seconds}")
    configure_logging(args.log_level)
    if not has_model_runtime():
        logging.getLogger("infergate.gateway").warning(
            "%s; services with a model_path will not start (static endpoints work)", NO_RUNTIME)
    location = args.registry or args.state_dir or DEFAULT_STATE_DIR
    host = f"[{args.host}]" if ":" in args.host else args.host

    async def make_app():
        from .. import auth
        from ..control import attach_control_plane
        from ..proxy.app import GatewayApp
        from ..registry import open_store

        store = open_store(location)
        auth.remember_signatures_in(store, args.replay_memory)
        app = GatewayApp(store, args.admin_token, args.max_body_mb << 20,
                         args.health_interval, args.access_log, args.max_connections,
                         args.open_discovery, args.max_response_mb << 20,
                         args.max_buffered_body_mb << 20, read_timeout=args.read_timeout,
                         idle_timeout=args.idle_timeout)
        attach_control_plane(app, location, f"http://{host}:{args.port}")
        app.bind(args.host, args.port, reuse_port=args.processes > 1, grpc_port=args.grpc_port)
        return app

    run_app(make_app, args.processes)
    return 0
