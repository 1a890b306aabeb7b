"""Export the Stable Diffusion safety checker to ONNX and a Triton model repository.

Run from the repository root: ``python -m export --model SRC --repository DIR``.
"""
