"""What one gateway is configured with: the command line's values, checked once at start."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import FrozenSet, Optional, Tuple, Union

from safety_checker_client import spec

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_MODEL_NAMES = ("safety-checker",)  # the name the KServe runtime was deployed under
DEFAULT_TRITON = "127.0.0.1:8001"
# A request's body: one full-size image file as base64 with room to spare; a caller sending batches raises it.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Requests checked at once; one more is answered 503 (or 429 on /v1) with Retry-After at once, never queued.
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_UPSTREAM_TIMEOUT_S = 60.0  # the deadline of one request to Triton
DEFAULT_FETCH_TIMEOUT_S = 10.0  # the whole fetch of one image URL, redirects included
DEFAULT_MAX_REDIRECTS = 3
RETRY_AFTER_S = 1  # what an overloaded gateway tells a caller to wait


class SettingsError(ValueError):
    """A configuration the gateway cannot start with; the message says which value and why."""


@dataclass(frozen=True)
class Settings:
    triton: str = DEFAULT_TRITON
    model_names: Tuple[str, ...] = DEFAULT_MODEL_NAMES
    api_key: Optional[bytes] = field(default=None, repr=False)  # None: no auth
    # Image URL hosts: names matched exactly (or "*.example.com"), and addresses or networks, which also
    # permit those addresses when they are private, loopback or link-local.
    allow_names: FrozenSet[str] = frozenset()
    allow_networks: Tuple[Network, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    upstream_timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_image_bytes: int = spec.MAX_ENCODED_BYTES
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    def __post_init__(self) -> None:
        if not self.model_names or any(not name or "/" in name for name in self.model_names):
            raise SettingsError(f"model names must be non-empty and hold no '/': {list(self.model_names)}")
        for name in ("max_body_bytes", "max_concurrency", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("upstream_timeout_s", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be more than 0, not {getattr(self, name)}")
        if self.max_redirects < 0:
            raise SettingsError(f"max_redirects must be at least 0, not {self.max_redirects}")


def allow_list(entries: Tuple[str, ...]) -> Tuple[FrozenSet[str], Tuple[Network, ...]]:
    """(host names, networks) of `--allow-host` entries: an address or CIDR network is a network, else a name."""
    names, networks = set(), []
    for entry in entries:
        text = entry.strip().lower().rstrip(".")
        try:
            networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
        except ValueError:
            if not text or "/" in text or ":" in text or " " in text:
                raise SettingsError(
                    f"--allow-host {entry!r} is neither a host name, an address nor a network"
                ) from None
            names.add(text)
    return frozenset(names), tuple(networks)


def read_api_key(path: Union[str, Path]) -> bytes:
    """The Bearer token a caller must send: the file's text without surrounding whitespace."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as error:
        raise SettingsError(f"cannot read the API key file {path}: {error.strerror or error}") from error
    if not key:
        raise SettingsError(f"the API key file {path} is empty")
    return key
