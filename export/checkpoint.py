"""Load a safety checker from the hub or a local directory, refusing anything else.

`from_pretrained` happily fills missing or mis-shaped weights with random
values and only warns; for a guardrail that would silently serve a different
model, so every such case is an error here.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from safety_checker_client import preprocess

DEFAULT_MODEL = "CompVis/stable-diffusion-safety-checker"
# How long the export waits to reach the hub before it says it cannot (the hub's own retries take minutes).
HUB_CONNECT_TIMEOUT_S = 5.0


class CheckpointError(RuntimeError):
    """The source is not a loadable StableDiffusionSafetyChecker."""


class HubUnreachableError(CheckpointError):
    """The checkpoint is on the hub, which cannot be reached, and not in the local cache: the offline ways out."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(
            f"cannot download {source!r}: {reason}. Offline, pass a local directory saved with save_pretrained "
            "instead (python -m export --model DIR; make serve MODEL=DIR), or try everything on a tiny "
            "random-weight checker with make demo"
        )


@dataclass
class Checkpoint:
    model: Any  # diffusers StableDiffusionSafetyChecker, in eval mode
    source: str
    preprocessor_config: Optional[Dict[str, Any]]


def _looks_like_path(source: str) -> bool:
    """Hub ids are "owner/name"; anything else, or anything that exists here, is a path."""
    if os.path.exists(source) or os.path.isabs(source) or source.startswith((".", "~")):
        return True
    return source.count("/") != 1 or os.path.isdir(source.split("/")[0])


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON: {err}") from err


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory saved with save_pretrained")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model saved with save_pretrained")
    config = _read_json(config_path)
    architectures = config.get("architectures") or []
    if "StableDiffusionSafetyChecker" not in architectures or "vision_config" not in config:
        raise CheckpointError(
            f"{path} is not a StableDiffusionSafetyChecker (config.json architectures={architectures}, "
            f"model_type={config.get('model_type')!r})"
        )


def load_checkpoint(source: str) -> Checkpoint:
    """Load `source` (hub id or local directory) as a float32 checker in eval mode."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    local = _looks_like_path(source)
    if local:
        path = Path(source).expanduser()
        _check_local_dir(path)
        source = str(path)
    else:
        _check_hub_reachable(source)
    try:
        model, info = StableDiffusionSafetyChecker.from_pretrained(source, output_loading_info=True)
    except Exception as err:  # transformers raises many types for the same failures
        if local:
            raise CheckpointError(f"cannot load the safety checker in {source}: {_first_line(err)}") from err
        if _hub_unreachable(err):
            raise HubUnreachableError(
                source,
                "it is not in the local cache, and the Hugging Face hub is out of reach (offline mode, or "
                "no connection)",
            ) from None
        raise CheckpointError(
            f"cannot load {source!r} from the Hugging Face hub (is the hub reachable, or pass a local "
            f"directory saved with save_pretrained?): {_first_line(err)}"
        ) from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "error_msgs") and v}
    if problems:
        raise CheckpointError(f"the weights in {source} do not match its config: {_summarise(problems)}")
    model = model.float().eval()
    return Checkpoint(model=model, source=source, preprocessor_config=_preprocessor_config(source, local))


def _check_hub_reachable(source: str) -> None:
    """Refuse at once, naming the way out, when the hub cannot be reached and `source` is not in the local cache.

    Offline mode, a cached checkpoint and a proxy (which a direct connection would not use) are left to
    `from_pretrained`."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or urllib.request.getproxies() or try_to_load_from_cache(source, "config.json"):
        return
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = f"the Hugging Face hub at {constants.ENDPOINT} cannot be reached ({error.strerror or error})"
        raise HubUnreachableError(source, reason) from None


def _hub_unreachable(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is huggingface_hub's "neither reachable nor cached" (offline
    mode, or a connection that failed through a proxy): told by type, as diffusers rewords it."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    cause: Optional[BaseException] = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _preprocessor_config(source: str, local: bool) -> Optional[Dict[str, Any]]:
    if local:
        path = Path(source) / "preprocessor_config.json"
        return _read_json(path) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(source, "preprocessor_config.json")))
    except Exception:  # optional file: the served contract does not depend on it
        return None


def check_preprocessor(config: Optional[Dict[str, Any]], source: str) -> None:
    """Refuse a checker whose own preprocessing differs from what the client sends.

    The client reproduces CompVis' CLIPImageProcessor settings; a checkpoint
    that expects other pixels would be served garbage without a word.
    """
    if config is None:
        return
    expected = {
        "image_mean": [float(v) for v in preprocess.IMAGE_MEAN],
        "image_std": [float(v) for v in preprocess.IMAGE_STD],
        "size": preprocess.SHORTEST_EDGE,
        "crop_size": preprocess.CROP_SIZE,
        "resample": int(preprocess.RESAMPLE),
    }
    found = {
        "image_mean": [float(v) for v in config.get("image_mean", [])],
        "image_std": [float(v) for v in config.get("image_std", [])],
        "size": (config.get("size") or {}).get("shortest_edge"),
        "crop_size": (config.get("crop_size") or {}).get("height"),
        "resample": config.get("resample"),
    }
    for key, want in expected.items():
        if not _same(found[key], want):
            raise CheckpointError(
                f"{source}: preprocessor_config.json has {key}={found[key]}, but the client sends pixels made "
                f"with {key}={want}"
            )


def _same(have: Any, want: Any) -> bool:
    """Equal, with float lists compared to the precision the config files are written with."""
    if isinstance(want, list):
        return len(have) == len(want) and bool(np.allclose(have, want, rtol=0, atol=1e-6))
    return have == want


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:400]


def _summarise(problems: Dict[str, Any]) -> str:
    parts = []
    for key, values in problems.items():
        values = list(values)
        shown = ", ".join(str(v) for v in values[:5])
        more = f" (+{len(values) - 5} more)" if len(values) > 5 else ""
        parts.append(f"{key.replace('_', ' ')}: {shown}{more}")
    return "; ".join(parts)
