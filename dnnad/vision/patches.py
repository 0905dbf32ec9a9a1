"""Patch features for localisation: intermediate stage maps of the backbone, each 3x3 average-pooled (every
patch sees its neighbourhood, as PatchCore aggregates), L2-normalised over its channels, brought to the
first (finest) stage's grid bilinearly and concatenated along channels: ``(n, d, h, w)`` float32, one
feature per image region. The per-stage normalisation weighs the stages equally: on MTD with Lite2 it
raised image ROC AUC from 0.898 to 0.964 (SPADE, K=10; ``benchmarks/localise.py``).

Computed inside the network's graph, so torch, the ONNX export and OpenVINO give the same features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .specs import BackboneSpec

NEIGHBOURHOOD = 3  # patch aggregation window, in feature-map cells
VERSION = 2  # of the aggregation, in the ONNX export's cache key: 2 = per-stage L2 normalisation


def aggregate_patches(maps: list[torch.Tensor]) -> torch.Tensor:
    """Stage maps (n, c_i, h_i, w_i), finest first → (n, sum c_i, h_0, w_0) float32."""
    h, w = maps[0].shape[-2:]
    out = []
    for m in maps:
        m = F.avg_pool2d(m.float(), NEIGHBOURHOOD, stride=1, padding=NEIGHBOURHOOD // 2, count_include_pad=False)
        m = F.normalize(m, dim=1)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1)


class PatchTaps:
    """Forward hooks on ``spec.patches`` stages of ``model``: after a forward pass, ``features()`` is the
    aggregated patch map of that pass."""

    def __init__(self, model: torch.nn.Module, spec: BackboneSpec):
        named = dict(model.named_modules())
        self.names = spec.patches
        self._maps: dict[str, torch.Tensor] = {}
        for name in self.names:
            named[name].register_forward_hook(lambda _m, _i, out, name=name: self._maps.__setitem__(name, out))

    def clear(self) -> None:
        self._maps.clear()

    def features(self) -> torch.Tensor:
        return aggregate_patches([self._maps[n] for n in self.names])
