"""`safety-checker scan`: check a whole tree of images as fast as the servers answer.

Registered in the `safety-checker` command through the entry-point group
`safety_checker.commands`. The report (JSON lines or CSV, by the extension)
gets one line per file, written as its answer arrives. With `--resume`, files
whose newest line in the report has an answer are not checked again; the
report is first rewritten (atomically) with one line per path, without the
lines of the files about to be checked again (an error, a skip), whose new
line is then appended. Ctrl-C stops handing out work, waits for the requests
in flight and writes their answers, so `--resume` checks every remaining
image exactly once; a second Ctrl-C abandons the requests in flight.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Dict, List, Optional

from safety_checker_client import spec, strictness
from safety_checker_client.client import DEFAULT_URLS, PROTOCOLS, server_address
from safety_checker_client.records import answered
from safety_checker_scan.files import NON_IMAGES, Filters, Item, expand, path_key
from safety_checker_scan.pacing import MAX_TIMEOUT_S, MAX_WINDOW, MIN_TIMEOUT_S, TIMEOUT_FACTOR
from safety_checker_scan.progress import Progress
from safety_checker_scan.report import ReportWriter, newest, read_report, report_format, shown
from safety_checker_scan.scanner import (
    DEFAULT_BATCH_SIZE,
    Scanner,
    ScanOptions,
    is_tty,
)
from safety_checker_scan.servers import COOLDOWN_S, RETRY_S
from safety_checker_scan.tally import Tally, merge, summary_lines

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FLAGGED = 3
EXIT_INTERRUPTED = 130

EPILOG = """\
exit status:
  0    every image was checked (and, with --fail-on-flagged, none was flagged);
       files that are not images were skipped
  1    any error: a file could not be read or was not answered (its report
       line has "error" and never "flagged"), or a flagged file could not be
       copied or moved; this wins over 3
  2    wrong arguments
  3    with --fail-on-flagged: every image was checked and at least one was
       flagged (in this run or, with --resume, already in the report)
  130  interrupted (Ctrl-C or SIGTERM): the answers in flight were written;
       run again with --resume to check the rest

Folders are walked recursively and every file in them is checked, except
those --include/--exclude leave out. A file that is not an image (neither its
content nor its extension is an image format's: a README.txt) gets a
"skipped" line and is counted apart (--non-images error: an error line); an
image that cannot be read is an error. PATH may also be a file, a glob
('photos/**/*.png', quoted) or '-' for a list of paths, one per line, on
stdin. Without --report the report goes to stdout (JSON lines) and the
progress to stderr; with --report the progress and the summary go to stdout.
A progress bar is drawn on a terminal, plain lines every few seconds
otherwise.

--include/--exclude GLOB match the path of a file relative to the folder it
was found in (a PATH folder, or a glob's leading folders), with '/' between
folders; a file named itself is matched by its name. A GLOB without '/'
matches the name alone, at any depth ('*.txt'); one with '/' the whole
relative path ('raw/*.png', '**/thumbs/**', '/raw': the top folder only).
'*', '?' and '[...]' stay within a folder, '**' crosses folders; case counts. A file is checked if it matches
some --include (when any is given) and no --exclude; a folder matching an
--exclude is not walked.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _concurrency(text: str) -> Optional[int]:
    """`auto` (None: each server's window sized from its answers) or a fixed number of requests in flight."""
    return None if text == "auto" else _positive(text)


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
        help=f"HOST:PORT of a server (http:// or https:// before it is dropped); repeat for several (default "
        f"{DEFAULT_URLS['grpc']} for gRPC, {DEFAULT_URLS['http']} for HTTP)",
    )
    scan.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="the servers' protocol (default grpc)")
    scan.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="check only files whose path below the scanned folder matches GLOB; repeatable (default: every file; "
        "see below)",
    )
    scan.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files and folders whose path below the scanned folder matches GLOB; repeatable, wins over "
        "--include (default: none)",
    )
    scan.add_argument(
        "--non-images",
        choices=NON_IMAGES,
        default="skip",
        help="a file that is not an image: skip it (a 'skipped' line, counted apart, exit status unaffected) or "
        "error (an error line, exit 1) (default skip)",
    )
    scan.add_argument(
        "--concurrency",
        type=_concurrency,
        default=None,
        metavar="auto|N",
        help="requests in flight: auto (the default) gives each server as many as keep it busy without a queue, "
        f"measured from its answers as the scan runs (1 to {MAX_WINDOW}); N: exactly N over all servers, in turn. "
        f"A server that fails is left at once for the others and rests {COOLDOWN_S:g} s or more",
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
        help="do not check again the files whose line in --report has an answer; check the rest (errors and skips "
        "included) and leave one line per file",
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
        default=None,
        metavar="SECONDS",
        help=f"per request (default: {TIMEOUT_FACTOR:g} times the server's recent latency, at least "
        f"{MIN_TIMEOUT_S:g} s, at most {MAX_TIMEOUT_S:g} s; over gRPC a request that times out is cancelled at the "
        f"server); images no server answers are tried again for up to {RETRY_S:g} s (or SECONDS, if shorter), then "
        "reported as not checked",
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
    if args.timeout is not None and args.timeout <= 0:
        return "--timeout must be positive"
    for url in args.urls or ():
        try:
            server_address(url)
        except ValueError as error:
            return f"--url: {error}"
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
        non_images=args.non_images,
    )
    human = sys.stdout if args.report else sys.stderr

    skip = {path_key(p) for p in (args.report, args.html, args.copy_flagged, args.move_flagged) if p}
    earlier: Dict[str, Dict[str, object]] = {}
    if args.resume:
        try:
            earlier = newest(read_report(args.report), path_key)
        except (OSError, ValueError) as error:
            print(f"error: cannot resume from {args.report}: {error}", file=sys.stderr)
            return EXIT_ERROR
    filters = Filters(args.include, args.exclude)
    items: List[Item] = []
    previous = Tally()
    try:
        for item in expand(args.paths, sys.stdin, skip, filters):
            record = earlier.get(path_key(item.path))
            if record is not None and answered(record) and item.error is None:
                previous.add(record)
            else:
                items.append(item)
                earlier.pop(path_key(item.path), None)  # checked again: its new line replaces the old one
    except KeyboardInterrupt:
        print("interrupted while listing the files; nothing was checked", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        writer = ReportWriter.open(args.report, list(earlier.values()) if args.resume else None)
    except OSError as error:
        print(f"error: cannot write the report {args.report}: {error}", file=sys.stderr)
        return EXIT_ERROR

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
    result.already_done = previous.checked
    result.excluded_files, result.excluded_folders = filters.files, filters.folders
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
