"""`make bench`: diffusers vs onnxruntime vs the served ensemble, measured side by side in one run."""
