"""The `safety-checker` console command: `check` images against a running server.

Other packages add their subcommands to the same command through the
entry-point group `safety_checker.commands`: the scan package (`pip install
./scan`) adds `scan`, the operator package (`pip install ./admin`) `serve`
and `concepts`, so the client never imports them and one command serves all.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Union

from safety_checker_client import spec
from safety_checker_client.client import (
    DEFAULT_URLS,
    PROTOCOLS,
    RECORD_OUTPUTS,
    CheckResult,
    Outcome,
    SafetyCheckerClient,
    Strictness,
    read_file,
)
from safety_checker_client.preprocess import ImageError, load_image
from safety_checker_client.records import record

# Each entry point is a function taking the subparsers object; it adds its
# subcommands and sets `run` (args -> exit status) as their default.
PLUGIN_GROUP = "safety_checker.commands"
# The subcommands other packages add, and what installs them.
PLUGIN_PACKAGES = {"scan": "./scan", "serve": "./admin", "concepts": "./admin", "gateway": "./gateway"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safety-checker",
        description="Check images with the safety checker served by Triton.",
        epilog="`scan` comes with pip install ./scan; `serve` and `concepts` with the operator package "
        "(pip install ./admin); `gateway` with pip install ./gateway.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="check image files; one JSON object per image on stdout")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument(
        "--url",
        help=f"HOST:PORT of the server (default {DEFAULT_URLS['grpc']} for gRPC, {DEFAULT_URLS['http']} for HTTP)",
    )
    check.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    check.add_argument(
        "--strictness",
        type=_strictness,
        metavar="PRESET|NUMBER",
        help=f"a preset ({', '.join(spec.STRICTNESS_PRESETS)}) or an adjustment in "
        f"[-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, {spec.MAX_STRICTNESS_ADJUSTMENT:g}] "
        "(default: the server's configured preset); any other is refused for every file",
    )
    check.add_argument(
        "--deadline",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to keep sending a request the server failed (unreachable, restarting, overloaded) before "
        "its images are reported as not checked (default 120)",
    )
    form = check.add_mutually_exclusive_group()
    form.add_argument(
        "--uint8",
        action="store_true",
        help="send resized uint8 images to safety_checker_uint8 (4x fewer bytes; same decisions)",
    )
    form.add_argument(
        "--encoded",
        action="store_true",
        help="send each file's bytes untouched to safety_checker_images, which decodes them "
        "(PNG, JPEG, WebP, GIF, BMP, TIFF; same decisions)",
    )
    check.set_defaults(run=_check)

    for command in _plugin_commands():
        command.load()(commands)
    return parser


def _plugin_commands():
    try:
        return entry_points(group=PLUGIN_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        return entry_points().get(PLUGIN_GROUP, ())


def _strictness(text: str) -> Strictness:
    """A preset name as it is, anything that reads as a number as that number; the client checks it."""
    try:
        return float(text)
    except ValueError:
        return text


def _emit(out: TextIO, line: dict) -> None:
    out.write(json.dumps(line) + "\n")
    out.flush()


def check_files(paths: Sequence[str], client: SafetyCheckerClient, out: TextIO, strictness: Strictness = None) -> int:
    """Print one record per file, in order; return the number of files that got no answer.

    Files are read and sent a batch at a time, so memory stays flat for any
    number of files. A file that cannot be read, or that the server did not
    answer, gets an "error" line and never a "flagged" field; a file the server
    refused takes no other file of its batch down with it (`check_each`).
    """
    failures = 0
    for start in range(0, len(paths), client.max_batch_size):
        chunk = paths[start : start + client.max_batch_size]
        outcomes: List[Union[Outcome, ImageError, None]] = [None] * len(chunk)
        loaded: Dict[int, object] = {}
        for position, path in enumerate(chunk):
            try:
                loaded[position] = read_file(path) if client.encoded else load_image(path)
            except ImageError as error:
                outcomes[position] = error
        items = list(loaded.values())
        try:
            batch = items if client.encoded or not items else client.preprocess(items)
            answers = client.check_each(batch, strictness) if items else []
        except ImageError as error:
            answers = [error] * len(items)
        for position, answer in zip(loaded, answers):
            outcomes[position] = answer
        for path, outcome in zip(chunk, outcomes):
            answer = outcome if isinstance(outcome, CheckResult) else None
            failures += answer is None
            _emit(out, record(path, answer, None if answer else outcome))
    return failures


def _check(args: argparse.Namespace) -> int:
    client = SafetyCheckerClient(
        args.url,
        protocol=args.protocol,
        uint8=args.uint8,
        encoded=args.encoded,
        deadline_s=args.deadline,
        outputs=RECORD_OUTPUTS,
    )
    with client:
        failures = check_files(args.files, client, sys.stdout, args.strictness)
    if failures:
        print(f"error: {failures} of {len(args.files)} images were not checked", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Iterable[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if argv and argv[0] in PLUGIN_PACKAGES and argv[0] not in {ep.name for ep in _plugin_commands()}:
        parser.error(f"'{argv[0]}' comes with another package: pip install {PLUGIN_PACKAGES[argv[0]]}")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
