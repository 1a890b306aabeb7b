"""A request's strictness: the request parameters that choose it, read and checked.

The postprocessor applies it; safety_checker_images (whose version folder
gets a copy from the export) checks it before decoding anything, so that a
bad parameter is refused there with the same words and status.
"""

import json
import math
from typing import Dict, Optional, Tuple


class Strictness:
    """The presets and the limit of the config's `parameters`, and the request parameters' names."""

    def __init__(self, parameters: Dict[str, str]) -> None:
        self.presets = {name: float(value) for name, value in json.loads(parameters["strictness_presets"]).items()}
        self.max_adjustment = float(parameters["max_strictness_adjustment"])
        self.preset_parameter = parameters["strictness_parameter"]
        self.adjustment_parameter = parameters["strictness_adjustment_parameter"]

    def of(self, request_parameters: Optional[str]) -> Tuple[Optional[float], Optional[str]]:
        """(adjustment, None) when the request chooses one, (None, None) when it does not, or (None, why not)
        for a bad choice. `request_parameters` is the request's parameters as JSON text."""
        try:
            parameters = json.loads(request_parameters or "{}")
        except ValueError:
            parameters = {}
        preset = parameters.get(self.preset_parameter)
        value = parameters.get(self.adjustment_parameter)
        if preset is not None and value is not None:
            return None, (
                f"request parameters {self.preset_parameter!r} and {self.adjustment_parameter!r} "
                "were both given; give one"
            )
        if preset is not None:
            if not isinstance(preset, str) or preset.lower() not in self.presets:
                return None, (
                    f"request parameter {self.preset_parameter!r}: unknown preset {preset!r} "
                    f"(one of {', '.join(self.presets)})"
                )
            return self.presets[preset.lower()], None
        if value is not None:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    number = None
            limit = self.max_adjustment
            if number is None or not math.isfinite(number) or abs(number) > limit:
                return None, (
                    f"request parameter {self.adjustment_parameter!r} = {value!r} must be a number "
                    f"in [{-limit:g}, {limit:g}]"
                )
            return number, None
        return None, None
