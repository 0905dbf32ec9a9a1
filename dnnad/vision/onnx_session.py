"""Sessions that give pooled features by layer name from an ONNX model (a user's ``onnx:`` model, or a torch
backbone exported by ``vision.runtimes``): ONNX Runtime's, or OpenVINO's at fp32."""
from __future__ import annotations

import numpy as np

from .specs import FINAL, PATCHES


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
        return pooled_taps(self.outputs, result)


class OpenVinoTaps:
    """The same model compiled by OpenVINO for the CPU at fp32 (``INFERENCE_PRECISION_HINT``: never the bf16
    it picks by itself on CPUs that have it), so the embedding stays within 1e-5 of torch's; or at bf16 when
    asked (``--precision bf16``), refused on a CPU without it."""

    def __init__(self, model: bytes | str, threads: int | None = None, output: str | None = None,
                 precision: str = "fp32"):
        import openvino as ov

        core = ov.Core()
        if precision == "bf16" and not has_bf16(core):
            raise RuntimeError("--precision bf16: this CPU has no bf16 support (OpenVINO's "
                               "OPTIMIZATION_CAPABILITIES); use fp32")
        net = core.read_model(model)
        # No pinning: each actor is its own process, and OpenVINO would pin every one of them to the same cores.
        config = {"INFERENCE_PRECISION_HINT": {"bf16": "bf16"}.get(precision, "f32"), "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(net, "CPU", config)
        names = [o.get_any_name() for o in net.outputs]
        self.outputs = [output] if output else names
        self._ports = [self.compiled.output(n) for n in self.outputs]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        result = self.compiled(np.ascontiguousarray(x, dtype=np.float32))
        return pooled_taps(self.outputs, [result[p] for p in self._ports])


def pooled_taps(names: list[str], outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, feature maps globally average-pooled (the patch map ``PATCHES`` kept as it is),
    float32; a user's model without a ``final`` output gives its (first) output as the embedding."""
    taps = {}
    for name, out in zip(names, outputs):
        if out.ndim > 2 and name != PATCHES:
            out = out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2)
        taps[name] = np.ascontiguousarray(out, dtype=np.float32)
    return taps if FINAL in taps else {FINAL: taps[names[0]]}


def has_bf16(core=None) -> bool:
    """Whether OpenVINO can run bf16 on this machine's CPU (AMX or AVX-512 BF16)."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
