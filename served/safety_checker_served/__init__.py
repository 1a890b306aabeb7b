"""What the safety checker's Triton Python models import, installed into each model's environment.

The export installs this package (with the client package, whose contract
and preprocessing it uses, and Pillow for the decoder) into the packed
environment every Python model names in its config (`EXECUTION_ENV_PATH`),
so the served code has one home and no model folder holds a copy of it.
Every module but `onnx_runner` imports nothing from Triton, so the
export, the benchmark and the tests use the very code the server runs.
"""
