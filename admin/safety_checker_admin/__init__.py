"""The operator's side of the safety checker: the bundled tritonserver launcher (`safety-checker serve`),
custom concept-set administration (`safety-checker concepts ...`), calibration and text embedding."""
