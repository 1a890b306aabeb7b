"""The `safety-checker` console command: `check` images against a running server, or `scan` many.

The operator package (`pip install ./admin`) adds its own subcommands (`serve`,
`concepts`) to the same command through the entry-point group
`safety_checker.commands`, so the client never imports server-side code and
one command name serves both.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple

from safety_checker_client import spec
from safety_checker_client.client import (
    DEFAULT_URLS,
    PROTOCOLS,
    CheckError,
    CheckResult,
    SafetyCheckerClient,
    Strictness,
    read_file,
    refused_image,
)
from safety_checker_client.preprocess import ImageError, load_image


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safety-checker",
        description="Check images with the safety checker served by Triton.",
        epilog="`serve` and `concepts` come with the operator package (pip install ./admin).",
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
        "(default: the server's configured preset)",
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

    from safety_checker_client.scan import add_parser as add_scan

    add_scan(commands, _strictness)

    for command in _plugin_commands():
        command.load()(commands)
    return parser


# Each entry point is a function taking the subparsers object; it adds its
# subcommands and sets `run` (args -> exit status) as their default.
PLUGIN_GROUP = "safety_checker.commands"


def _plugin_commands():
    try:
        return entry_points(group=PLUGIN_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        return entry_points().get(PLUGIN_GROUP, ())


def _strictness(text: str) -> Strictness:
    """A preset name as it is, anything that reads as a number as that number."""
    try:
        return float(text)
    except ValueError:
        return text


def _chunks(paths: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _emit(out: TextIO, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def check_files(paths: Sequence[str], client: SafetyCheckerClient, out: TextIO, strictness: Strictness = None) -> int:
    """Print one JSON line per file, in order; return the number of files that got no answer.

    Files are read and sent a batch at a time, so memory stays flat for any
    number of files. A file that cannot be read, or whose batch the server did
    not answer, gets an "error" line and never a "flagged" field. With an
    encoded client the server decodes the files, and one it cannot decode
    refuses its whole batch: the files of a batch refused for one image are
    then sent one at a time, so that each gets its own answer or error.
    """
    failures = 0
    batch_size = client.max_batch_size
    for chunk in _chunks(paths, batch_size):
        loaded: List[Tuple[str, object]] = []
        errors = {}
        for path in chunk:
            try:
                loaded.append((path, read_file(path) if client.encoded else load_image(path)))
            except ImageError as err:
                errors[path] = str(err)
        answers = _answers(client, loaded, strictness, errors)
        for path in chunk:
            if path in answers:
                _emit(out, {"path": path, **answers[path].as_dict()})
            else:
                failures += 1
                _emit(out, {"path": path, "error": errors[path]})
    return failures


def _answers(
    client: SafetyCheckerClient, loaded: List[Tuple[str, object]], strictness: Strictness, errors: Dict[str, str]
) -> Dict[str, CheckResult]:
    """The server's answer per path; the reason of every path without one goes into `errors`."""
    if not loaded:
        return {}
    check = client.check_encoded if client.encoded else client.check
    try:
        results = check([item for _, item in loaded], strictness=strictness)
        return {path: result for (path, _), result in zip(loaded, results)}
    except (CheckError, ImageError) as err:
        refused = isinstance(err, CheckError) and refused_image(err) is not None
        if not (client.encoded and refused and len(loaded) > 1):
            # A file the server refused is named, as one the client could not read is.
            named = client.encoded and refused
            errors.update({path: f"{path}: {err}" if named else str(err) for path, _ in loaded})
            return {}
    answers = {}
    for item in loaded:
        answers.update(_answers(client, [item], strictness, errors))
    return answers


def _check(args: argparse.Namespace) -> int:
    try:
        client = SafetyCheckerClient(
            args.url, protocol=args.protocol, uint8=args.uint8, encoded=args.encoded, deadline_s=args.deadline
        )
        with client:
            failures = check_files(args.files, client, sys.stdout, args.strictness)
    except CheckError as err:  # the server could not even be asked for its config
        for path in args.files:
            _emit(sys.stdout, {"path": path, "error": str(err)})
        print(f"error: {err}", file=sys.stderr)
        return 1
    if failures:
        print(f"error: {failures} of {len(args.files)} images were not checked", file=sys.stderr)
        return 1
    return 0


# The operator package's subcommands, named when it is not installed.
OPERATOR_COMMANDS = ("serve", "concepts")


def main(argv: Optional[Iterable[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if argv and argv[0] in OPERATOR_COMMANDS and argv[0] not in {ep.name for ep in _plugin_commands()}:
        parser.error(f"'{argv[0]}' comes with the operator package: pip install ./admin")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
