"""The family's norm: RMSNorm, or LayerNorm with bias (``spec.norm == "layer"``), alone or after a residual add."""

from __future__ import annotations

import numpy as np

from ..models.spec import DecoderSpec
from .builder import GraphBuilder


class Norm:
    def __init__(self, g: GraphBuilder, spec: DecoderSpec, weights: dict, ct, fused: bool) -> None:
        self.g, self.spec, self.weights, self.ct, self.fused = g, spec, weights, ct, fused

    def __call__(self, x: str, weight_name: str) -> str:
        g, spec = self.g, self.spec
        w = self._weight(weight_name)
        if spec.norm == "layer":  # standard ONNX since opset 17
            return g.op("LayerNormalization", [x, w, self._bias(weight_name)], axis=-1, epsilon=spec.rms_norm_eps)
        if self.fused:
            return g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=spec.rms_norm_eps, stash_type=1)
        # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern ORT itself fuses into SimplifiedLayerNormalization
        var = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0, np.float32)])], axes=[-1], keepdims=1)
        denom = g.op("Sqrt", [g.op("Add", [var, g.const(spec.rms_norm_eps, np.float32)])])
        return g.op("Mul", [g.op("Div", [x, denom]), w])

    def add(self, residual: str, x: str, weight_name: str) -> tuple[str, str]:
        """(norm(residual + x), residual + x): one Skip(Simplified)LayerNormalization node when fused."""
        g, spec = self.g, self.spec
        if not self.fused:
            h = g.op("Add", [residual, x])
            return self(h, weight_name), h
        w = self._weight(weight_name)
        if spec.norm == "layer":
            y, _, _, h = g.op("SkipLayerNormalization", [x, residual, w, self._bias(weight_name)], outs=[None, "", "", None],
                              domain="com.microsoft", epsilon=spec.rms_norm_eps)  # fmt: skip
            return y, h
        y, _, _, h = g.op("SkipSimplifiedLayerNormalization", [x, residual, w], outs=[None, "", "", None], domain="com.microsoft",
                          epsilon=spec.rms_norm_eps)  # fmt: skip
        return y, h

    def _weight(self, name: str) -> str:  # Gemma's (1 + w) folded in
        return self.g.weight(name, (self.weights[name] + np.float32(self.spec.norm_offset)).astype(self.ct))

    def _bias(self, weight_name: str) -> str:  # a LayerNorm's beta, beside its weight
        name = weight_name.replace(".weight", ".bias")
        return self.g.weight(name, self.weights[name].astype(self.ct))
