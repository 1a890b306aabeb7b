"""`make bench`: diffusers vs onnxruntime vs the served ensemble, measured side by side in one run, then
`safety-checker scan` against the served checker and against a tiny one (the client's ceiling)."""
