"""`safety-checker gateway`: serve the KServe runtime's route and OpenAI's moderations in front of Triton."""

from __future__ import annotations

import argparse
import logging
import sys

from safety_checker_gateway import settings as defaults
from safety_checker_gateway.settings import Settings, SettingsError, allow_list, read_api_key

DEFAULT_PORT = 8080  # KServe's port for a transformer or a predictor container
DEFAULT_HOST = "127.0.0.1"  # loopback unless told: a container passes --host 0.0.0.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def add_parser(commands) -> argparse.ArgumentParser:
    """The `gateway` subcommand on the `safety-checker` command's subparsers (the entry point)."""
    gateway = commands.add_parser(
        "gateway",
        help="serve the KServe runtime's /v2/models/safety-checker/infer and OpenAI's /v1/moderations over Triton",
        description="An HTTP gateway in front of Triton's safety_checker_images: the KServe runtime's route, "
        "answered as it answered, and OpenAI's POST /v1/moderations for image_url parts. See docs/gateway.md.",
    )
    gateway.add_argument(
        "--triton",
        default=defaults.DEFAULT_TRITON,
        metavar="HOST:GRPC_PORT",
        help=f"Triton's gRPC endpoint (default {defaults.DEFAULT_TRITON})",
    )
    gateway.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    gateway.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    gateway.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <the file's text>' on the infer and moderation routes (default: none)",
    )
    gateway.add_argument(
        "--model-name",
        action="append",
        dest="model_names",
        metavar="NAME",
        help=f"a name /v2/models/NAME/infer answers to, and /v1/moderations' model; repeat for several "
        f"(default {defaults.DEFAULT_MODEL_NAMES[0]})",
    )
    gateway.add_argument(
        "--allow-host",
        action="append",
        dest="allow_hosts",
        default=[],
        metavar="H",
        help="a host image URLs may be fetched from: a name (exact, or *.example.com), or an address or CIDR "
        "network, which also permits private, loopback and link-local addresses in it; repeat for several "
        "(default: none, only data URLs)",
    )
    gateway.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=defaults.DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; larger ones get 413 (default {defaults.DEFAULT_MAX_BODY_BYTES})",
    )
    gateway.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=defaults.DEFAULT_MAX_CONCURRENCY,
        help="requests checked at once; more get 503 (429 on /v1) with Retry-After "
        f"(default {defaults.DEFAULT_MAX_CONCURRENCY})",
    )
    gateway.add_argument(
        "--upstream-timeout",
        type=_positive_float,
        default=defaults.DEFAULT_UPSTREAM_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of one request to Triton; past it, 503 (default {defaults.DEFAULT_UPSTREAM_TIMEOUT_S:g})",
    )
    gateway.add_argument(
        "--fetch-timeout",
        type=_positive_float,
        default=defaults.DEFAULT_FETCH_TIMEOUT_S,
        metavar="SECONDS",
        help=f"time to fetch one image URL, redirects included (default {defaults.DEFAULT_FETCH_TIMEOUT_S:g})",
    )
    gateway.add_argument(
        "--max-image-bytes",
        type=_positive_int,
        default=Settings.max_image_bytes,
        help=f"largest image fetched from a URL or a data URL (default {Settings.max_image_bytes})",
    )
    gateway.add_argument(
        "--max-redirects",
        type=int,
        default=defaults.DEFAULT_MAX_REDIRECTS,
        help=f"redirects followed for one image URL, each checked as the URL was (default "
        f"{defaults.DEFAULT_MAX_REDIRECTS})",
    )
    gateway.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines written (default info); no level writes image data",
    )
    gateway.set_defaults(run=run)
    return gateway


def settings_from(args: argparse.Namespace) -> Settings:
    names, networks = allow_list(tuple(args.allow_hosts))
    return Settings(
        triton=args.triton,
        model_names=tuple(args.model_names or defaults.DEFAULT_MODEL_NAMES),
        api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
        allow_names=names,
        allow_networks=networks,
        max_body_bytes=args.max_body_bytes,
        max_concurrency=args.max_concurrency,
        upstream_timeout_s=args.upstream_timeout,
        fetch_timeout_s=args.fetch_timeout,
        max_image_bytes=args.max_image_bytes,
        max_redirects=args.max_redirects,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from safety_checker_gateway.app import Gateway

    try:
        settings = settings_from(args)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(Gateway(settings).app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
