"""An ONNX Runtime session that gives pooled features by layer name: a user's ``onnx:`` model, or a torch
backbone exported by ``vision.runtimes``."""
from __future__ import annotations

import numpy as np

from .specs import FINAL


class OnnxTaps:
    """An ONNX Runtime session of an exported ``TapNet`` (or a user's ``onnx:`` model): pooled features by
    layer name, float32."""

    def __init__(self, model: bytes | str, threads: int | None = None, gpu: bool = False,
                 output: str | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model, opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [output] if output else [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        result = self.session.run(self.outputs, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        taps = {}
        for name, out in zip(self.outputs, result):
            out = out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2) if out.ndim > 2 else out
            taps[name] = np.ascontiguousarray(out, dtype=np.float32)
        if FINAL not in taps:  # a user's model: its (first) output is the embedding
            taps = {FINAL: taps[self.outputs[0]]}
        return taps
