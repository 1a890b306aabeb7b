"""The operator's key to Triton's admin APIs: which APIs it opens, how callers send it, where it is read from.

Triton restricts the model repository, logging, trace and shared-memory APIs
(`--http-restricted-api` / `--grpc-restricted-protocol`) to callers that
send the key (header `admin-key`; over gRPC the metadata
`triton-grpc-protocol-admin-key`). Without an operator's key a random one
that is never shown is used, so those calls are refused outright. Inference,
health, metadata and statistics stay open.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Mapping, Optional, Tuple

from safety_checker_admin.errors import ServerError

# The admin APIs, restricted to callers with the key; inference, health, metadata and statistics stay open.
ADMIN_APIS = ("model-repository", "logging", "trace", "shared-memory")
ADMIN_KEY_HEADER = "admin-key"
# Over gRPC Triton expects the restricted-protocol header under this prefix.
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# Where `safety-checker serve` reads the operator's key when no --admin-key-file is given.
ADMIN_KEY_ENV = "SAFETY_CHECKER_ADMIN_KEY"
# What survives Triton's parsing of <apis>:<header>=<key> (no ',', ':', '=' or spaces) and is long enough.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.~+/-]{16,256}$")


def restriction(key: str) -> str:
    """The value of --http-restricted-api and --grpc-restricted-protocol (Triton 2.51: <apis>:<header>=<key>).

    `key` is written as given: a key, or a reference a deployment expands (Kubernetes' `$(ADMIN_API_KEY)`)."""
    return f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={key}"


def check_key(key: str) -> str:
    """`key`, if Triton's command line can carry it; ServerError saying what a key may hold otherwise."""
    if not _KEY_PATTERN.match(key):
        raise ServerError(
            "the admin key must be 16-256 letters, digits or any of _ . ~ + / - "
            "(e.g. the output of `openssl rand -hex 32`)"
        )
    return key


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
        return check_key(key), f"the key in {path}"
    key = environ.get(ADMIN_KEY_ENV, "").strip()
    if key:
        return check_key(key), f"the key in ${ADMIN_KEY_ENV}"
    return None, "refused to everyone (no key given)"
