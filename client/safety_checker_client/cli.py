"""The `safety-checker` console command: `check` images against a running server.

Other packages add their subcommands through the entry-point group `safety_checker.commands` (scan: `scan`; admin:
`serve`, `concepts`; gateway: `gateway`), so the client never imports them and one command serves all.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple, Union

from safety_checker_client import client, spec, strictness
from safety_checker_client.preprocess import ImageError, load_image
from safety_checker_client.records import record

# Each entry point, given the subparsers object, adds its subcommands with `run` (args -> exit status) as default.
PLUGIN_GROUP = "safety_checker.commands"
# The subcommands other packages add, and what installs them.
PLUGIN_PACKAGES = {"scan": "./scan", "serve": "./admin", "concepts": "./admin", "gateway": "./gateway"}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FLAGGED = 0, 1, 2, 3  # as scan's
EPILOG = (
    "exit status: 0 every image was checked (with --fail-on-flagged: and none was flagged); 1 an image was not checked "
    '(its line has "error", never "flagged"), which wins over 3; 2 wrong arguments; 3 any flagged (--fail-on-flagged).'
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safety-checker",
        description="Check images with the safety checker served by Triton.",
        epilog="`scan` comes with pip install ./scan; `serve` and `concepts` with the operator package "
        "(pip install ./admin); `gateway` with pip install ./gateway.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="check image files; one JSON object per image on stdout", epilog=EPILOG)
    check.add_argument("files", nargs="+", metavar="FILE", help="an image file, or - for paths on stdin (one a line)")
    urls = client.DEFAULT_URLS
    check.add_argument(
        "--url",
        type=partial(_usage, client.server_address),
        help=f"HOST:PORT, http:// or https:// allowed (default {urls['grpc']} for gRPC, {urls['http']} for HTTP)",
    )
    check.add_argument("--protocol", choices=client.PROTOCOLS, default="grpc", help="gRPC or HTTP (default grpc)")
    check.add_argument(
        "--strictness",
        type=partial(_usage, strictness.parse),
        metavar="PRESET|NUMBER",
        help=f"a preset ({', '.join(spec.STRICTNESS_PRESETS)}) or an adjustment in "
        f"[-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, {spec.MAX_STRICTNESS_ADJUSTMENT:g}] "
        "(default: the server's configured preset); any other is refused before anything is sent",
    )
    seconds = {"type": float, "metavar": "SECONDS"}
    check.add_argument(
        "--connect-deadline",
        default=client.CONNECT_DEADLINE_S,
        help="how long to keep trying while no connection can be made (nothing listens at --url) before every "
        f"image is reported as not checked (default {client.CONNECT_DEADLINE_S:g}; at most --deadline)",
        **seconds,
    )
    check.add_argument(
        "--deadline",
        default=120.0,
        help="how long to keep sending a request a server that answered before failed (restarting, overloaded) "
        "before its images are reported as not checked (default 120)",
        **seconds,
    )
    check.add_argument("--fail-on-flagged", action="store_true", help="exit 3 when any image was flagged (as scan)")
    form = check.add_mutually_exclusive_group()
    form.add_argument(
        "--uint8", action="store_true", help="send uint8 images to safety_checker_uint8 (4x fewer bytes, same answers)"
    )
    form.add_argument(
        "--encoded",
        action="store_true",
        help="send each file's bytes untouched to safety_checker_images, which decodes them "
        f"({', '.join(spec.IMAGE_FORMATS)}; same decisions)",
    )
    check.set_defaults(run=_check)

    for command in _plugin_commands():
        command.load()(commands)
    return parser


def _version() -> str:
    try:
        return version("safety-checker-client")
    except PackageNotFoundError:  # run from a checkout without pip install ./client
        return "(not installed)"


def _plugin_commands():
    try:
        return entry_points(group=PLUGIN_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        return entry_points().get(PLUGIN_GROUP, ())


def _usage(parse: Callable[[str], object], text: str) -> object:
    """`parse(text)`, its ValueError a usage error in its own words (argparse exits 2 and names the option)."""
    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def check_files(
    paths: Sequence[str], checker: client.SafetyCheckerClient, out: TextIO, strictness: client.Strictness = None
) -> Tuple[int, int]:
    """Print one record per file, in order; return (files that got no answer, files flagged).

    Files are read and sent a batch at a time, so memory stays flat. A file that cannot be read or was not answered gets
    an "error" line, never "flagged"; one the server refused takes no other of its batch down with it (`check_each`)."""
    failures = flagged = 0
    for start in range(0, len(paths), checker.max_batch_size):
        chunk = paths[start : start + checker.max_batch_size]
        outcomes: List[Union[client.Outcome, ImageError, None]] = [None] * len(chunk)
        loaded: Dict[int, object] = {}
        for position, path in enumerate(chunk):
            try:
                loaded[position] = client.read_file(path) if checker.encoded else load_image(path)
            except ImageError as error:
                outcomes[position] = error
        items = list(loaded.values())
        try:
            batch = items if checker.encoded or not items else checker.preprocess(items)
            answers = checker.check_each(batch, strictness) if items else []
        except ImageError as error:
            answers = [error] * len(items)
        for position, answer in zip(loaded, answers):
            outcomes[position] = answer
        for path, outcome in zip(chunk, outcomes):
            answer = outcome if isinstance(outcome, client.CheckResult) else None
            failures += answer is None
            flagged += bool(answer and answer.flagged)
            out.write(json.dumps(record(path, answer, None if answer else outcome)) + "\n")
            out.flush()
    return failures, flagged


def _paths(operands: Sequence[str], stdin: TextIO) -> List[str]:
    """The FILE operands, each - replaced by the paths on stdin, one a line (blank lines ignored, as scan)."""
    paths: List[str] = []
    for operand in operands:
        paths += [line.rstrip("\r\n") for line in stdin if line.strip()] if operand == "-" else [operand]
    return paths


def _check(args: argparse.Namespace) -> int:
    paths = _paths(args.files, sys.stdin)
    if not paths:
        print("safety-checker check: error: no FILE on stdin", file=sys.stderr)
        return EXIT_USAGE
    checker = client.SafetyCheckerClient(
        args.url,
        protocol=args.protocol,
        uint8=args.uint8,
        encoded=args.encoded,
        deadline_s=args.deadline,
        connect_deadline_s=args.connect_deadline,
        outputs=client.RECORD_OUTPUTS,
        warn=lambda message: print(f"safety-checker check: {message}", file=sys.stderr, flush=True),
    )
    with checker:
        failures, flagged = check_files(paths, checker, sys.stdout, args.strictness)
    if failures:
        print(f"error: {failures} of {len(paths)} images were not checked", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_FLAGGED if args.fail_on_flagged and flagged else EXIT_OK


def main(argv: Optional[Iterable[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if argv and argv[0] in PLUGIN_PACKAGES and argv[0] not in {ep.name for ep in _plugin_commands()}:
        parser.error(f"'{argv[0]}' comes with another package: pip install {PLUGIN_PACKAGES[argv[0]]}")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
