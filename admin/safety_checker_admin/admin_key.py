"""The operator's key to Triton's admin APIs: which APIs it opens, how callers send it, where it is read from.

Triton restricts the model repository, logging, trace and shared-memory APIs
(`--http-restricted-api` / `--grpc-restricted-protocol`) to callers that
send the key (header `admin-key`; over gRPC the metadata
`triton-grpc-protocol-admin-key`). Without an operator's key a random one
that is never shown is used, so those calls are refused outright. Inference,
health, metadata and statistics stay open.

Nothing starts with a key anyone could know: shorter than MIN_KEY_CHARS, or
one of PLACEHOLDER_KEYS (every placeholder the repository ever shipped). The
launcher checks a key with `check_key`; docker-compose's entrypoint and the
KServe runtimes run the same rule as shell lines (`shell_check`, rendered into
them by `python -m deploy.render`) before tritonserver starts.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from safety_checker_admin.errors import ServerError

# The admin APIs, restricted to callers with the key; inference, health, metadata and statistics stay open.
ADMIN_APIS = ("model-repository", "logging", "trace", "shared-memory")
ADMIN_KEY_HEADER = "admin-key"
# Over gRPC Triton expects the restricted-protocol header under this prefix.
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# Where `safety-checker serve` reads the operator's key when no --admin-key-file is given.
ADMIN_KEY_ENV = "SAFETY_CHECKER_ADMIN_KEY"
# A key is MIN_KEY_CHARS to MAX_KEY_CHARS of what survives Triton's parsing of <apis>:<header>=<key> (no ',',
# ':', '=' or spaces). The shell check spells the same character class.
MIN_KEY_CHARS = 32
MAX_KEY_CHARS = 256
_KEY_CHARACTERS = "A-Za-z0-9_.~+/-"
_KEY_PATTERN = re.compile(f"[{_KEY_CHARACTERS}]*")
# Every placeholder key the repository ever shipped (in a manifest, a doc, an example): refused wherever it shows up.
PLACEHOLDER_KEYS = ("REPLACE-ME-with-openssl-rand-hex-32",)
HOW_TO_MAKE_ONE = "a random one, e.g. the output of `openssl rand -hex 32`"
_PLACEHOLDER = "is a placeholder printed in this repository, which anyone can read"
_CHARACTERS = "holds a character other than letters, digits and _ . ~ + / -"


def restriction(key: str) -> str:
    """The value of --http-restricted-api and --grpc-restricted-protocol (Triton 2.51: <apis>:<header>=<key>).

    `key` is written as given: a key, or a reference a deployment expands (Kubernetes' `$(ADMIN_API_KEY)`)."""
    return f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={key}"


def key_problem(key: str) -> Optional[str]:
    """Why `key` must not open the admin APIs (None: it may): a placeholder, a character Triton's command line
    cannot carry, or a length outside MIN_KEY_CHARS..MAX_KEY_CHARS. The key itself is never repeated."""
    if key in PLACEHOLDER_KEYS:
        return _PLACEHOLDER
    if not _KEY_PATTERN.fullmatch(key):
        return _CHARACTERS
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS:
        return f"has {len(key)} characters, not {MIN_KEY_CHARS}-{MAX_KEY_CHARS}"
    return None


def check_key(key: str, source: str = "the admin key") -> str:
    """`key`, if it may open the admin APIs; ServerError saying what is wrong and what to use instead otherwise."""
    problem = key_problem(key)
    if problem is not None:
        raise ServerError(f"{source} {problem}: use {HOW_TO_MAKE_ONE}")
    return key


def shell_check(variable: str, source: str, remedy: str) -> List[str]:
    """POSIX sh lines that stop the script (exit 1, one line on stderr: the key's `source`, what is wrong,
    `remedy`) unless the key in $`variable` passes `key_problem`'s rule: what a deployment's entrypoint runs before
    tritonserver. The texts hold no quote, backslash or '$': they pass through a shell, YAML and Kubernetes."""
    if re.search(r"[\\'\"$`]", variable + source + remedy) or not all(map(_KEY_PATTERN.fullmatch, PLACEHOLDER_KEYS)):
        raise ValueError("the check's texts must pass through a shell untouched")
    length = f"${{#{variable}}}"
    return [
        f'case "${variable}" in',
        f'  {"|".join(PLACEHOLDER_KEYS)}) problem="{_PLACEHOLDER}" ;;',
        f'  *[!{_KEY_CHARACTERS}]*) problem="{_CHARACTERS}" ;;',
        '  *) problem="" ;;',
        "esac",
        f'if [ -z "$problem" ] && {{ [ "{length}" -lt {MIN_KEY_CHARS} ] || '
        f'[ "{length}" -gt {MAX_KEY_CHARS} ]; }}; then',
        f'  problem="has {length} characters, not {MIN_KEY_CHARS}-{MAX_KEY_CHARS}"',
        "fi",
        'if [ -n "$problem" ]; then',
        f'  echo "error: the admin key {source} $problem: {remedy}" >&2',
        "  exit 1",
        "fi",
    ]


def random_key() -> str:
    """A key nobody is shown: the admin APIs are then refused to every caller."""
    return secrets.token_hex(32)


def read_admin_key(path: Optional[Path], environ: Mapping[str, str] = os.environ) -> Tuple[Optional[str], str]:
    """(the operator's admin key, where it came from): --admin-key-file, else $SAFETY_CHECKER_ADMIN_KEY, else
    (None, ...), which makes the launcher use a random key that nobody is shown."""
    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except OSError as error:
            raise ServerError(f"cannot read the admin key file {path}: {error.strerror or error}") from None
        return check_key(key, f"the admin key in {path}"), f"the key in {path}"
    key = environ.get(ADMIN_KEY_ENV, "").strip()
    if key:
        return check_key(key, f"the admin key in ${ADMIN_KEY_ENV}"), f"the key in ${ADMIN_KEY_ENV}"
    return None, "refused to everyone (no key given)"
