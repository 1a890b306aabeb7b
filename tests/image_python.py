"""A stand-in for the NGC 24.10 image's Python: the standard library and NumPy, nothing else.

The image's Python backend stubs see the packed environment of their model
and what the image's Python has: its standard library and the NumPy the
image's recipe installs. Tests that must prove a repository needs nothing
more (tests/test_deploy_runtime.py, tests/test_environment.py) export with
`--stub-python` pointed at this: a prefix laid out as an installed Python
(bin/python3.X, lib/python3.X/ with its own site-packages), whose standard
library is this Python's (linked, since the bundled server's stubs embed
this Python's libpython) and whose site-packages holds NumPy only, at
requirements/served.txt's pin, installed from the wheelhouse (no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from export import environment

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def build(root: Path, wheelhouse: Path = environment.DEFAULT_WHEELHOUSE) -> Path:
    """Lay the stand-in out in `root` (readable by every uid); its interpreter's path, for `--stub-python`."""
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": sys.base_prefix, "base": sys.base_prefix})["stdlib"])
    lib = root / "lib" / f"python{VERSION}"
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    (root / "bin").mkdir()
    python = root / "bin" / f"python{VERSION}"
    python.symlink_to(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    (numpy,) = environment.pinned(["numpy"])
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-index", "--no-deps",
         "--no-compile", "--find-links", str(wheelhouse), "--target", str(lib / "site-packages"), numpy],
        check=True,
    )  # fmt: skip
    root.chmod(0o755)
    return python


def site_packages(python: Path) -> Path:
    return python.parent.parent / "lib" / f"python{VERSION}" / "site-packages"
