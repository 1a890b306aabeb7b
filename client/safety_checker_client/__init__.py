"""The thin client of the safety checker served by Triton: the contract (`spec`), CLIP preprocessing,
`SafetyCheckerClient`, the `safety-checker check` and `scan` commands, and the diffusers drop-in
`diffusers.TritonSafetyChecker`; it needs tritonclient, numpy and pillow only."""
