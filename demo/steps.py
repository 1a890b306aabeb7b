"""The demo's steps: build the tiny checker, export it, serve it, write sample images, check and scan them.

The checker has random weights (fixtures.checkers), so its decisions mean
nothing: the demo shows the commands and their outputs, not a moderation.
Every step is what a user would run by hand (docs/demo.md lists them); the
server runs on free ports unless told which, and stops when the demo ends,
however it ends.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
# The photographs written into the examples folder (scikit-image's samples; licences in docs/demo.md), by file
# name: two JPEGs and two PNGs.
PHOTOS = {"astronaut.jpg": "astronaut", "coffee.jpg": "coffee", "chelsea.png": "chelsea", "rocket.png": "rocket"}
# One image drawn here, so that one example owes nothing to anyone.
GENERATED = "gradient.png"
# What the export of the demo's checker records, so that a second demo serves the repository it wrote.
STAMP = ".exported-from"
CHECKER_ID = "fixtures.checkers tiny, seed 0"
PORTS = ("http", "grpc", "metrics")
WARNING = (
    "The served checker has RANDOM weights: its decisions (flagged or not) and scores mean nothing. "
    "It shows the commands at work; serve the real checkpoint with make serve."
)


def build_checker(folder: Path) -> Path:
    """The tiny random-weight checker, saved as the published one is (python -m fixtures.checkers does the same)."""
    from fixtures import checkers

    if not (folder / "config.json").is_file():
        checkers.save_checker(folder, checkers.build_checker("tiny", seed=0))
    return folder


def export(checker: Path, repository: Path) -> None:
    """`python -m export` on the checker, unless `repository` already holds its export."""
    stamp = repository / STAMP
    if stamp.is_file() and stamp.read_text().strip() == CHECKER_ID:
        print(f"{repository} already holds the demo's checker (delete it to export again)", flush=True)
        return
    command = [sys.executable, "-m", "export", "--model", str(checker), "--repository", str(repository)]
    _run(command, "the export")
    stamp.write_text(CHECKER_ID + "\n")


def write_examples(folder: Path) -> List[Path]:
    """The sample images: scikit-image's photographs at their own size, and a gradient drawn here."""
    import numpy as np
    from PIL import Image

    from fixtures.photos import photo_file

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, photo in PHOTOS.items():
        (folder / name).write_bytes(photo_file(photo, "jpeg" if name.endswith(".jpg") else "png"))
        written.append(folder / name)
    rows, columns = np.mgrid[0:240, 0:320]
    pixels = np.stack([columns * 255 // 319, rows * 255 // 239, np.full_like(rows, 128)], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(folder / GENERATED)
    written.append(folder / GENERATED)
    return written


def _command(name: str) -> str:
    """An installed console command of this interpreter's environment (the venv make setup built)."""
    installed = Path(sys.executable).parent / name
    return str(installed) if installed.is_file() else name


def _run(command: Sequence[str], what: str) -> None:
    """Run a step as a user would, from the checkout, showing the command and its output as it comes; DemoError
    if it fails."""
    print(f"\n$ {' '.join(_shown(part) for part in command)}", flush=True)
    code = subprocess.run(list(command), cwd=ROOT).returncode
    if code != 0:
        raise DemoError(f"{what} failed with exit status {code} (its output is above)")


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the checkout when under it."""
    prefix = str(ROOT) + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


class DemoError(RuntimeError):
    """A step failed; the message says which."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--examples", type=Path, default=Path("examples"), help="where the sample images go (default: examples)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("build/demo"),
        help="where the checker, its model repository and the scan's reports go (default: build/demo)",
    )
    for name in PORTS:
        parser.add_argument(f"--{name}-port", type=int, default=0, help="the server's port (default 0: a free one)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; 0 once check and scan have answered every image, 1 naming the step that failed."""
    from safety_checker_admin import server as launcher
    from safety_checker_admin.errors import ServerError

    args = _parser().parse_args(argv)
    examples, work = args.examples.resolve(), args.work.resolve()
    print(WARNING, flush=True)
    try:
        checker = build_checker(work / "checker")
        print(f"built the tiny random-weight checker in {_shown(str(checker))}", flush=True)
        repository = work / "repository"
        export(checker, repository)
        images = write_examples(examples)
        print(f"wrote {len(images)} sample images into {_shown(str(examples))}", flush=True)
        ports: Dict[str, int] = {
            f"{name}_port": getattr(args, f"{name}_port") or launcher.free_port() for name in PORTS
        }
        with launcher.TritonServer(repository, **ports) as server:
            print(f"\nserving {_shown(str(repository))}: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
            _run([_command("safety-checker"), "check", "--url", server.grpc_url, *map(str, images)], "check")
            html, report = work / "scan.html", work / "scan.jsonl"
            scan = [_command("safety-checker"), "scan", str(examples), "--url", server.grpc_url]
            _run([*scan, "--report", str(report), "--html", str(html)], "scan")
    except (DemoError, ServerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the server, if started, has stopped on the way out of the with block
        print("interrupted", file=sys.stderr)
        return 130
    places = {
        f"{_shown(str(examples))}/": "the sample images (scikit-image's photographs and a drawn gradient)",
        _shown(str(report)): "scan's report: one JSON line per image",
        _shown(str(html)): "scan's page for a moderator: open it in a browser",
    }
    width = max(map(len, places))
    print("\nThe server has stopped. Where to look:")
    for place, what in places.items():
        print(f"  {place.ljust(width)}  {what}")
    print(f"To serve the demo's repository yourself: safety-checker serve --repository {_shown(str(repository))}")
    print(f"\n{WARNING}")
    return 0
