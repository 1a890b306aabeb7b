"""The CPU normaliser: its model.onnx tabulated once at load, then served as a NumPy lookup.

The normaliser's graph maps each uint8 value of each channel to one float on
its own (export/normalize.py), so it is a 256 x channels table. onnxruntime
runs it as cast, multiply, add, gather and transpose over every element, which
on a CPU costs about as much as the tiny embedder itself; one NumPy index into the
same table gives the same floats at a fraction of that. The table is read out
of the ONNX file by running it (never typed here), and `initialize` checks the
lookup against onnxruntime on random images before serving: a graph that is not
a per-value lookup fails the load instead of answering differently.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served.onnx_runner import OnnxRunner

LEVELS = 256
# Random images the lookup is checked on at load, besides the one holding every level.
CHECK_IMAGES = 2


class TabulatedSession:
    """What OnnxRunner uses of an onnxruntime session (`run`), as a lookup in the table `session` computes."""

    def __init__(self, session, input_name: str, output_name: str) -> None:
        self.input_name, self.output_name = input_name, output_name
        shape = session.get_inputs()[0].shape  # [batch, height, width, channels]
        height, width, channels = (int(d) for d in shape[1:])
        if height * width < LEVELS:
            raise pb_utils.TritonModelException(f"a {height}x{width} image cannot hold all {LEVELS} levels")
        every_level = np.zeros((1, height, width, channels), dtype=np.uint8)
        every_level.reshape(-1, channels)[:LEVELS] = np.arange(LEVELS, dtype=np.uint8)[:, None]
        (tabulated,) = session.run([output_name], {input_name: every_level})
        self.table = np.ascontiguousarray(tabulated.reshape(channels, -1)[:, :LEVELS])  # [channels, 256]
        # One flat table, channel c's levels at c * 256: one fancy index on uint16 does the whole batch.
        self.flat = self.table.reshape(-1)
        self.offsets = (np.arange(channels, dtype=np.uint16) * LEVELS)[:, None, None]
        rng = np.random.default_rng(0)
        images = rng.integers(0, LEVELS, size=(CHECK_IMAGES, height, width, channels), dtype=np.uint8)
        (expected,) = session.run([output_name], {input_name: images})
        if not np.array_equal(self.lookup(images).view(np.uint32), expected.view(np.uint32)):
            raise pb_utils.TritonModelException("the normaliser's ONNX graph is not a per-value lookup")

    def lookup(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> float32 [N, C, H, W]: channels first, each value offset by its channel's row."""
        index = images.transpose(0, 3, 1, 2).astype(np.uint16)
        index += self.offsets
        return self.flat[index]

    def run(self, output_names, feeds):
        return [self.lookup(feeds[self.input_name])]


class LookupRunner(OnnxRunner):
    """OnnxRunner with the session's graph tabulated (its limits, batching and error handling unchanged)."""

    def initialize(self, args):
        super().initialize(args)
        (output_name,) = self.output_names
        self.session = TabulatedSession(self.session, self.input_name, output_name)
