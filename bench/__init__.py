"""`make bench`: diffusers vs onnxruntime vs the served ensemble, measured side by side in one run, then
`safety-checker scan` against the served checker and against a tiny one (the client's ceiling).

`make overload` (overload.py): memory, refusals and latency under 64 clients sending 32-image requests.
`make soak` (soak.py): ten minutes at saturation with concept reloads and a stub kill.
"""
