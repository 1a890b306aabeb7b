"""The operator's subcommands of `safety-checker`, registered through the entry-point group
`safety_checker.commands` (see the client's cli.py): `serve` and `concepts`.

Only argparse runs here when the command line is parsed; each command imports
what it needs when it runs, so `safety-checker check` stays as light with the
operator package installed as without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="serve a model repository with the bundled CPU tritonserver")
    serve.add_argument("--repository", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="address HTTP and gRPC bind to (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument(
        "--model-config-name", default="cpu", help="use configs/NAME.pbtxt where a model has one (default: cpu)"
    )
    serve.add_argument(
        "--admin-key-file",
        type=Path,
        help="a file holding the key that opens the admin APIs (model repository, logging, trace, shared memory; "
        "header admin-key); default: $SAFETY_CHECKER_ADMIN_KEY, else they are refused to everyone",
    )
    serve.add_argument(
        "--no-restart",
        dest="supervise",
        action="store_false",
        help="do not watch the server and restore it after a fault (a dead Python stub, a failing inference)",
    )
    serve.add_argument(
        "--probe-interval", type=float, default=2.0, help="seconds between health probes (a real inference)"
    )
    serve.add_argument(
        "--probe-timeout",
        type=float,
        default=5.0,
        help="seconds a health probe may wait while the server uses no CPU before it counts as hung",
    )
    serve.add_argument(
        "--gateway-port",
        type=int,
        metavar="PORT",
        help="also run the gateway (pip install ./gateway) on this port of --host, in front of the server's gRPC "
        "port: the KServe runtime's /v2/models/safety-checker/infer and OpenAI's /v1/moderations (docs/gateway.md)",
    )
    serve.add_argument(
        "--gateway-api-key-file",
        type=Path,
        metavar="FILE",
        help="the gateway requires 'Authorization: Bearer <the file's text>' (default: no key)",
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from safety_checker_admin.serve import serve_forever

    if args.gateway_api_key_file is not None and args.gateway_port is None:
        print("error: --gateway-api-key-file needs --gateway-port", file=sys.stderr)
        return 2
    return serve_forever(
        args.repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        model_config_name=args.model_config_name,
        admin_key_file=args.admin_key_file,
        supervise=args.supervise,
        probe_interval_s=args.probe_interval,
        probe_timeout_s=args.probe_timeout,
        gateway_port=args.gateway_port,
        gateway_api_key_file=args.gateway_api_key_file,
    )


def add_concepts(commands) -> None:
    from safety_checker_admin import concepts

    concepts.add_parser(commands)
