"""The strictness a request chooses: one reading of the rule, for the client, scan and the server.

A request chooses a preset by name (`strictness`) or an adjustment by number (`strictness_adjustment`), at most one of
them. The server reads both from the request parameters with its config's presets and limit; the client and scan check a
user's choice with the contract's own before sending anything. Both call `adjustment`, so a choice is refused with the
same words everywhere.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Union

from safety_checker_client import spec

Strictness = Union[str, float, None]
"""A preset name ("weak", "normal", ...), an adjustment in [-0.1, 0.1], or None for the server's preset."""


class StrictnessError(ValueError):
    """A strictness choice that no server would accept; the message names the parameter."""


def adjustment(
    preset: object = None,
    value: object = None,
    presets: Mapping[str, float] = spec.STRICTNESS_PRESETS,
    limit: float = spec.MAX_STRICTNESS_ADJUSTMENT,
    preset_parameter: str = spec.STRICTNESS_PARAMETER,
    adjustment_parameter: str = spec.STRICTNESS_ADJUSTMENT_PARAMETER,
) -> Optional[float]:
    """The adjustment a preset name or a number chooses, None when neither is given.

    A preset is matched without regard to case; a number may be given as text (the HTTP/JSON protocol carries strings).
    Raises StrictnessError for both at once, an unknown preset, or a number that is not finite or beyond `limit`."""
    if preset is not None and value is not None:
        raise StrictnessError(
            f"request parameters {preset_parameter!r} and {adjustment_parameter!r} were both given; give one"
        )
    if preset is not None:
        if not isinstance(preset, str) or preset.lower() not in presets:
            raise StrictnessError(
                f"request parameter {preset_parameter!r}: unknown preset {preset!r} (one of {', '.join(presets)})"
            )
        return float(presets[preset.lower()])
    if value is None:
        return None
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or abs(number) > limit:
        raise StrictnessError(
            f"request parameter {adjustment_parameter!r} = {value!r} must be a number in [{-limit:g}, {limit:g}]"
        )
    return number


def parse(text: str) -> Strictness:
    """A command-line choice: anything that reads as a number is an adjustment, else a preset; checked."""
    try:
        choice: Strictness = float(text)
    except ValueError:
        choice = text
    request_parameters(choice)
    return choice


def request_parameters(strictness: Strictness) -> Optional[Dict[str, object]]:
    """The request parameters that choose `strictness` (None: the server's preset), checked first."""
    if strictness is None:
        return None
    if isinstance(strictness, str):
        adjustment(preset=strictness)
        return {spec.STRICTNESS_PARAMETER: strictness}
    if isinstance(strictness, bool) or not isinstance(strictness, (int, float)):
        raise StrictnessError(f"strictness must be a preset name or a number, not {strictness!r}")
    adjustment(value=strictness)
    return {spec.STRICTNESS_ADJUSTMENT_PARAMETER: float(strictness)}
