"""The thin client of the safety checker served by Triton: the contract (`spec`), CLIP preprocessing,
`SafetyCheckerClient` and the `safety-checker check` command; it needs tritonclient, numpy and pillow only."""
