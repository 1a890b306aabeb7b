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

from safety_checker_admin import command_line

# Where `make serve` exports the checkpoint, and so where serve and concepts look by default.
DEFAULT_REPOSITORY = "build/repository"


def add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model repository with the bundled CPU tritonserver",
        description="Serve a model repository written by `python -m export` with the tritonserver of the "
        "nvidia-pytriton wheel, on CPU, until Ctrl-C. `make serve` exports the checkpoint and runs this.",
    )
    serve.add_argument(
        "--repository",
        type=Path,
        default=Path(DEFAULT_REPOSITORY),
        help=f"the model repository to serve (default: {DEFAULT_REPOSITORY}, where make serve exports)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address HTTP and gRPC bind to (default 127.0.0.1)")
    for name, flag in (("HTTP", "--http-port"), ("gRPC", "--grpc-port"), ("metrics", "--metrics-port")):
        default = command_line.DEFAULT_PORTS[name]
        serve.add_argument(flag, type=int, default=default, help=f"the {name} port (default {default})")
    serve.add_argument(
        "--check-ports",
        action="store_true",
        help="only check that the ports are free, and exit (1 naming a port in use): make serve runs this before "
        "the export, so that a port conflict is reported at once",
    )
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
        help="do not watch the server and restore it after a fault (a dead Python stub, a failing inference); "
        "default: watch it and restart it after a fault",
    )
    serve.add_argument(
        "--probe-interval",
        type=float,
        default=2.0,
        help="seconds between health probes (a real inference; default 2)",
    )
    serve.add_argument(
        "--probe-timeout",
        type=float,
        default=5.0,
        help="seconds a health probe may wait while the server uses no CPU before it counts as hung (default 5)",
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
    from safety_checker_admin.serve import check_ports, serve_forever

    if args.gateway_api_key_file is not None and args.gateway_port is None:
        print("error: --gateway-api-key-file needs --gateway-port", file=sys.stderr)
        return 2
    if args.check_ports:
        ports = {"HTTP": args.http_port, "gRPC": args.grpc_port, "metrics": args.metrics_port}
        if args.gateway_port is not None:
            ports["gateway"] = args.gateway_port
        return check_ports(args.host, ports)
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
