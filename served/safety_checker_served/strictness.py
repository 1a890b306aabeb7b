"""A request's strictness, read from its parameters with the presets and limit of the model's config.

The rule itself is the client's (`safety_checker_client.strictness`), so that
the server refuses a choice with the words the client and scan use.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

from safety_checker_client.strictness import StrictnessError, adjustment


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
        if not isinstance(parameters, dict):  # the front ends send an object; request_limits refuses the rest
            parameters = {}
        try:
            chosen = adjustment(
                parameters.get(self.preset_parameter),
                parameters.get(self.adjustment_parameter),
                presets=self.presets,
                limit=self.max_adjustment,
                preset_parameter=self.preset_parameter,
                adjustment_parameter=self.adjustment_parameter,
            )
        except StrictnessError as error:
            return None, str(error)
        return chosen, None
