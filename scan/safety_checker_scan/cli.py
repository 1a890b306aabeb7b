"""`safety-checker scan`: check a whole tree of images as fast as the servers answer.

Registered in the `safety-checker` command through the entry-point group
`safety_checker.commands`. The report (JSON lines or CSV, by the extension)
gets one line per file, written as its answer arrives. With `--resume`, files
that already have an answer in the report are skipped; files that only have
an error line there are checked again and get a new line (the last line for a
path is the one that counts). Ctrl-C stops handing out work, waits for the
requests in flight and writes their answers, so `--resume` checks every
remaining image exactly once; a second Ctrl-C abandons the requests in flight.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Dict, List, Optional

from safety_checker_client import spec, strictness
from safety_checker_client.client import DEFAULT_URLS, PROTOCOLS
from safety_checker_client.records import answered
from safety_checker_scan.files import Item, expand, path_key
from safety_checker_scan.progress import Progress
from safety_checker_scan.report import ReportWriter, read_report, report_format, shown
from safety_checker_scan.scanner import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    Scanner,
    ScanOptions,
    is_tty,
)
from safety_checker_scan.tally import Tally, merge, summary_lines

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FLAGGED = 3
EXIT_INTERRUPTED = 130

EPILOG = """\
exit status:
  0    every image was checked (and, with --fail-on-flagged, none was flagged)
  1    any error: a file could not be read or was not answered (its report
       line has "error" and never "flagged"), or a flagged file could not be
       copied or moved; this wins over 3
  2    wrong arguments
  3    with --fail-on-flagged: every image was checked and at least one was
       flagged (in this run or, with --resume, already in the report)
  130  interrupted (Ctrl-C or SIGTERM): the answers in flight were written;
       run again with --resume to check the rest

Folders are walked recursively and every file in them is checked (a file that
is not an image gets an error line: nothing in the tree is skipped silently).
PATH may also be a file, a glob ('photos/**/*.png', quoted) or '-' for a list
of paths, one per line, on stdin. Without --report the report goes to stdout
(JSON lines) and the progress to stderr; with --report the progress and the
summary go to stdout. A progress bar is drawn on a terminal, plain lines
every few seconds otherwise.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _strictness(text: str) -> strictness.Strictness:
    """A preset or an adjustment, checked by the rule the server applies (a wrong one is a usage error)."""
    try:
        return strictness.parse(text)
    except strictness.StrictnessError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_parser(commands) -> argparse.ArgumentParser:
    """The `scan` subcommand on the `safety-checker` command's subparsers (the entry point)."""
    scan = commands.add_parser(
        "scan",
        help="check a tree of images fast: many requests in flight, a report, a summary",
        description="Check every image under PATH... with the served checker: many requests in flight across\n"
        "one or more servers, one report line per file, a summary at the end.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("paths", nargs="+", metavar="PATH", help="folder (walked recursively), file, glob, or -")
    scan.add_argument(
        "--url",
        action="append",
        dest="urls",
        metavar="URL",
        help=f"HOST:PORT of a server; repeat for several (default {DEFAULT_URLS['grpc']} for gRPC, "
        f"{DEFAULT_URLS['http']} for HTTP)",
    )
    scan.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    scan.add_argument(
        "--concurrency",
        type=_positive,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight, over all servers (default {DEFAULT_CONCURRENCY})",
    )
    scan.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=f"images per request (default {DEFAULT_BATCH_SIZE}; larger ones are split at the contract's "
        f"max_batch_size, {spec.MAX_BATCH_SIZE})",
    )
    scan.add_argument(
        "--workers",
        type=_positive,
        default=ScanOptions.workers,
        metavar="W",
        help=f"threads reading and preprocessing files (default {ScanOptions.workers}: the cores, at least 2)",
    )
    form = scan.add_mutually_exclusive_group()
    form.add_argument(
        "--uint8", action="store_true", help="send resized uint8 images to safety_checker_uint8 (4x fewer bytes)"
    )
    form.add_argument(
        "--encoded",
        action="store_true",
        help="send each file's bytes untouched to safety_checker_images, which decodes them on the server",
    )
    scan.add_argument(
        "--strictness",
        type=_strictness,
        metavar="PRESET|NUMBER",
        help=f"a preset ({', '.join(spec.STRICTNESS_PRESETS)}) or an adjustment in "
        f"[-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, {spec.MAX_STRICTNESS_ADJUSTMENT:g}] "
        "(default: the server's configured preset)",
    )
    scan.add_argument(
        "--report",
        metavar="FILE.jsonl|FILE.csv",
        help="write the report here (default: JSON lines on stdout); replaced unless --resume",
    )
    scan.add_argument(
        "--resume",
        action="store_true",
        help="skip files that already have an answer in --report, append the rest",
    )
    aside = scan.add_mutually_exclusive_group()
    aside.add_argument("--copy-flagged", metavar="DIR", help="copy each flagged file into DIR")
    aside.add_argument("--move-flagged", metavar="DIR", help="move each flagged file into DIR")
    scan.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained page for a moderator: summary, per-concept counts, score histogram, "
        "flagged images blurred until clicked",
    )
    scan.add_argument("--fail-on-flagged", action="store_true", help="exit with status 3 when any image was flagged")
    scan.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per request (default {DEFAULT_TIMEOUT_S:g})",
    )
    scan.set_defaults(run=run)
    return scan


def _usage_error(args: argparse.Namespace) -> Optional[str]:
    if args.resume and not args.report:
        return "--resume needs --report FILE"
    if args.report:
        try:
            report_format(args.report)
        except ValueError as error:
            return str(error)
    if args.timeout <= 0:
        return "--timeout must be positive"
    return None


def run(args: argparse.Namespace) -> int:
    """`safety-checker scan`; returns the exit status (see EPILOG)."""
    problem = _usage_error(args)
    if problem:
        print(f"safety-checker scan: error: {problem}", file=sys.stderr)
        return 2
    options = ScanOptions(
        urls=args.urls or [DEFAULT_URLS[args.protocol]],
        protocol=args.protocol,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        workers=args.workers,
        mode="encoded" if args.encoded else "uint8" if args.uint8 else "float",
        strictness=args.strictness,
        timeout_s=args.timeout,
        copy_to=args.copy_flagged,
        move_to=args.move_flagged,
    )
    human = sys.stdout if args.report else sys.stderr

    skip = {path_key(p) for p in (args.report, args.html, args.copy_flagged, args.move_flagged) if p}
    earlier: Dict[str, Dict[str, object]] = {}
    if args.resume:
        try:
            for record in read_report(args.report):
                if answered(record):
                    earlier[path_key(str(record["path"]))] = record
        except (OSError, ValueError) as error:
            print(f"error: cannot resume from {args.report}: {error}", file=sys.stderr)
            return EXIT_ERROR
    try:
        writer = ReportWriter.open(args.report, args.resume)
    except OSError as error:
        print(f"error: cannot write the report {args.report}: {error}", file=sys.stderr)
        return EXIT_ERROR
    items: List[Item] = []
    previous = Tally()
    try:
        for item in expand(args.paths, sys.stdin, skip):
            record = earlier.get(path_key(item.path))
            if record is not None and item.error is None:
                previous.add(record)
            else:
                items.append(item)
    except KeyboardInterrupt:
        writer.close()
        print("interrupted while listing the files; nothing was checked", file=sys.stderr)
        return EXIT_INTERRUPTED

    progress = Progress(human, len(items), tty=is_tty(human))
    stop = threading.Event()
    scanner = Scanner(options, writer, progress, stop=stop, warn=lambda m: print(m, file=sys.stderr, flush=True))

    def interrupt(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    handled = (signal.SIGINT, signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.signal(sig, interrupt) for sig in handled} if main_thread else {}
    try:
        progress.show(force=True)
        result = scanner.run(items)
    except KeyboardInterrupt:
        progress.clear()
        writer.close()
        print("abandoned the requests in flight; --resume checks them again", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # worker threads may be waiting on the network: do not join them
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    progress.close()
    writer.close()
    result.skipped = previous.checked
    total = merge(previous, result.tally)

    if args.html:
        from safety_checker_scan.html_report import write_page

        try:
            write_page(args.html, total, result, options, report=args.report)
        except OSError as error:
            print(f"error: cannot write {args.html}: {error}", file=sys.stderr)
            result.file_errors += 1
    for line in summary_lines(total, result, args.report and shown(args.report), args.html and shown(args.html)):
        print(line, file=human)
    human.flush()

    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.tally.errors or result.file_errors:
        return EXIT_ERROR
    if args.fail_on_flagged and total.flagged:
        return EXIT_FLAGGED
    return EXIT_OK
