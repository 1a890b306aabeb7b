"""The packed Python environment each Python model names in its config (the Python backend's EXECUTION_ENV_PATH).

Why this mechanism: it is the Python backend's own (python_backend README,
"Creating Custom Execution Environments"). Before it starts a model's stub,
the backend unpacks the model's `python_env.tar.gz` once and sources its
`bin/activate`; the stub's embedded Python then takes the environment's
folder for its prefix, because it finds `python3` first on PATH there. A
repository so carries what its models import, and the stock NGC image (no
Pillow) serves every model from S3 or a volume as it is.

Why this layout: the stub embeds one Python and the environment must match
it, while one repository serves two: the NGC 24.10 image's Python 3.10 and
the bundled server's (the export's own Python). So the archive holds one
virtual environment per Python version, and `bin/activate` picks the one of
the `python3` the stub was started with:

    bin/activate                          picks <version>/ by `python3`'s version
    3.10/pyvenv.cfg                       home = /usr/bin, the image's packages included
    3.10/bin/python3 -> /usr/bin/python3.10
    3.10/lib/python3.10/site-packages/    safety_checker_client, safety_checker_served (+ pillow,
                                          or onnxruntime: what the model names)
    3.11/...                              the same for the export's Python; a .pth adds the
                                          site-packages of the virtualenv it runs in, which the
                                          bundled server's stubs see too (and whose pillow and
                                          onnxruntime are not packed again)

The packages are installed by pip from wheels: this checkout's client and
served packages, built when their sources change, and the pinned third-party
ones (requirements/served.txt) from the wheelhouse `make setup` fills, so an
export needs no network; an environment that sees an outer virtualenv leaves
out what that virtualenv has (outer_packages). Built archives are cached by a digest of everything
that goes into them.

`stub_python` builds the export's Python's environment as the NGC one is
built instead: on a given interpreter of that version, with no .pth, so the
bundled server's stubs see only what that interpreter has besides the
environment (the KServe runtime's test gives it one that has only NumPy,
as the image's Python).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
# This project's packages every environment holds, by their folders in the checkout.
PROJECT_PACKAGES = ("client", "served")
PINS = ROOT / "requirements" / "served.txt"
DEFAULT_WHEELHOUSE = ROOT / ".wheelhouse"
CACHE = ROOT / "build" / "environments"
# The NGC 24.10 Triton image's Python, which its Python backend's stub embeds.
NGC_PYTHON = "3.10"
NGC_PYTHON_EXECUTABLE = "/usr/bin/python3.10"
# The wheels' platforms the NGC image (Ubuntu 22.04, x86-64) and this machine both run.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
COMPRESS_LEVEL = 6
# What a package folder may hold that is not its source.
_NOT_SOURCE = ("__pycache__", "build")

ACTIVATE = """\
# Sourced by Triton's Python backend before it starts this model's stub (EXECUTION_ENV_PATH): puts the
# virtual environment for the stub's Python first on PATH, where the stub's embedded Python finds its prefix.
# Written by `python -m export` (export/environment.py).
_env_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_env_python="$(python3 -I -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || return 1
if [ ! -d "$_env_root/$_env_python" ]; then
    echo "python_env: no packages for Python $_env_python in $_env_root (has: $(cd "$_env_root" && ls -d 3.*))" >&2
    unset _env_root _env_python
    return 1
fi
export PATH="$_env_root/$_env_python/bin:$PATH"
unset _env_root _env_python
"""


class EnvironmentBuildError(RuntimeError):
    """The environment cannot be built (a wheel is missing, pip failed); the message says what to do."""


@dataclass(frozen=True)
class PythonTarget:
    """One Python an environment is built for: its version, the interpreter the venv runs and what it sees."""

    version: str  # "3.10"
    executable: str  # the interpreter bin/python3 links to
    outer_site: Tuple[str, ...] = ()  # site-packages added after the environment's own (.pth)

    @property
    def home(self) -> str:
        return os.path.dirname(self.executable)


def ngc_target() -> PythonTarget:
    return PythonTarget(NGC_PYTHON, NGC_PYTHON_EXECUTABLE)


def this_python() -> PythonTarget:
    """The export's own Python, which the bundled server's stubs embed, with the virtualenv it runs in."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    outer = tuple(site.getsitepackages()) if sys.prefix != sys.base_prefix else ()
    return PythonTarget(version, executable, outer)


def stub_python(executable: str) -> PythonTarget:
    """The export's Python's environment on `executable`, seeing its packages only, as the NGC image's Python.

    `executable` is kept as given, not resolved: the folder it is in is the environment's `home`, where Python
    looks for its standard library and site-packages. It must be this Python's version, which the bundled
    server's stubs embed."""
    own = this_python().version
    try:
        result = subprocess.run(
            [executable, "-I", "-c", 'import sys; print("%d.%d" % sys.version_info[:2])'],
            capture_output=True,
            text=True,
        )
    except OSError as error:
        raise EnvironmentBuildError(f"cannot run the stubs' Python {executable}: {error}") from None
    version = result.stdout.strip()
    if result.returncode != 0 or version != own:
        raise EnvironmentBuildError(
            f"the stubs' Python {executable} is {version or 'not a Python'} ({result.stderr.strip()[-300:]}), "
            f"not Python {own}, which the bundled server's stubs embed"
        )
    return PythonTarget(own, os.path.abspath(executable))


def default_targets(own: Optional[PythonTarget] = None) -> Tuple[PythonTarget, ...]:
    """The NGC image's Python and the export's own (`own`, default this_python(); once, when it is 3.10)."""
    if own is not None and own.version == NGC_PYTHON:
        raise EnvironmentBuildError(f"the stubs' Python is {NGC_PYTHON}, whose environment is the NGC image's")
    own = own or this_python()
    return (ngc_target(),) if own.version == NGC_PYTHON else (ngc_target(), own)


def pinned(requirements: Iterable[str], pins: Path = PINS) -> List[str]:
    """Each requirement name with its pin from requirements/served.txt (name==version)."""
    table = {}
    for line in pins.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            table[_name(line.split("==")[0])] = line
    missing = [name for name in requirements if _name(name) not in table]
    if missing:
        raise EnvironmentBuildError(f"{pins} pins no version of {', '.join(missing)}")
    return [table[_name(name)] for name in requirements]


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def outer_packages(target: PythonTarget) -> Set[str]:
    """The distributions the target's outer virtualenv has installed, which its environment then leaves out:
    the bundled server's stubs import the very ones the export ran with (its onnxruntime quantises and verifies
    the models; requirements/served.txt's is for the NGC image's Python 3.10)."""
    found = importlib.metadata.distributions(path=list(target.outer_site)) if target.outer_site else ()
    return {_name(dist.metadata["Name"]) for dist in found}


def _digest(requirements: Dict[str, List[str]], targets: Sequence[PythonTarget]) -> str:
    sha = hashlib.sha256()
    sha.update(repr((requirements, [t.__dict__ for t in targets], ACTIVATE, COMPRESS_LEVEL)).encode())
    for folder in PROJECT_PACKAGES:
        for path in sorted((ROOT / folder).rglob("*")):
            relative = path.relative_to(ROOT)
            if path.is_file() and not any(part in _NOT_SOURCE or part.endswith(".egg-info") for part in relative.parts):
                sha.update(str(relative).encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:20]


def _pip(*arguments: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *arguments],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise EnvironmentBuildError(f"pip {arguments[0]} failed: {result.stderr.strip()[-1500:]}")


def _project_wheels(scratch: Path) -> Path:
    """This checkout's packages as wheels, built from a copy so the checkout gets no build/ folders."""
    wheels = scratch / "wheels"
    sources = []
    for folder in PROJECT_PACKAGES:
        copy = scratch / "src" / folder
        shutil.copytree(ROOT / folder, copy, ignore=shutil.ignore_patterns(*_NOT_SOURCE, "*.egg-info"))
        sources.append(str(copy))
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), *sources)
    return wheels


def _install(target: PythonTarget, root: Path, wheels: Path, wheelhouse: Path, requirements: List[str]) -> None:
    site_packages = root / target.version / "lib" / f"python{target.version}" / "site-packages"
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    try:
        _pip(
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--only-binary=:all:",
            "--no-compile",
            "--implementation",
            "cp",
            "--python-version",
            target.version,
            *platforms,
            "--find-links",
            str(wheels),
            "--find-links",
            str(wheelhouse),
            "--target",
            str(site_packages),
            *[f"safety-checker-{folder}" for folder in PROJECT_PACKAGES],
            *requirements,
        )
    except EnvironmentBuildError as error:
        raise EnvironmentBuildError(
            f"cannot install {', '.join(requirements) or 'the packages'} for Python {target.version} from "
            f"{wheelhouse} ({error}); `make setup` downloads the pinned wheels there"
        ) from None
    (root / target.version / "bin").mkdir(parents=True)
    os.symlink(target.executable, root / target.version / "bin" / "python3")
    (root / target.version / "pyvenv.cfg").write_text(
        f"home = {target.home}\ninclude-system-site-packages = true\nversion = {target.version}\n"
    )
    if target.outer_site:
        (site_packages / "outer-virtualenv.pth").write_text("".join(f"{path}\n" for path in target.outer_site))


def _pack(root: Path, archive: Path) -> None:
    """A tar.gz of the environment, written beside `archive` and renamed onto it: exports that build the same
    archive at once (tests in parallel) each write a file of their own, and a reader never sees a part."""
    fd, partial = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=COMPRESS_LEVEL) as tar:
            for path in sorted(root.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        os.chmod(partial, 0o644)
        os.replace(partial, archive)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def build(
    requirements: Sequence[str],
    targets: Sequence[PythonTarget] = (),
    wheelhouse: Path = DEFAULT_WHEELHOUSE,
    cache: Path = CACHE,
) -> Path:
    """The packed environment with this project's packages and `requirements` (names, pinned in served.txt)."""
    targets = tuple(targets) or default_targets()
    pins = {}
    for target in targets:  # what the target's outer virtualenv has is not packed again
        outer = outer_packages(target)
        pins[target.version] = [p for p in pinned(requirements) if _name(p.split("==")[0]) not in outer]
    archive = cache / f"python_env-{_digest(pins, targets)}.tar.gz"
    if archive.is_file():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="safety-checker-env-") as scratch:
        wheels = _project_wheels(Path(scratch))
        root = Path(scratch) / "env"
        for target in targets:
            _install(target, root, wheels, wheelhouse, pins[target.version])
        (root / "bin").mkdir()
        (root / "bin" / "activate").write_text(ACTIVATE)
        _pack(root, archive)
    return archive


def build_all(model_requirements: Iterable[Tuple[str, ...]], **options) -> Dict[Tuple[str, ...], Path]:
    """One archive per distinct set of requirements."""
    return {requirements: build(requirements, **options) for requirements in set(model_requirements)}
