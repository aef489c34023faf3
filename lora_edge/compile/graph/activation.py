"""Element-wise functions of the MLPs and of soft-capping."""

from __future__ import annotations

import numpy as np

from .builder import GraphBuilder


def activation(g: GraphBuilder, kind: str, x: str, fused: bool, ct) -> str:
    """``spec.activation``: "silu", or "gelu_tanh" (GELU's tanh approximation, gelu_pytorch_tanh / gelu_new)."""
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if fused:  # one kernel
        return g.op("FastGelu", [x], domain="com.microsoft")
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [g.op("Mul", [g.op("Mul", [x, x]), x]), g.const(0.044715, ct)])]),
                         g.const(float(np.sqrt(2 / np.pi)), ct)])  # fmt: skip
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5, ct)]), g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, ct)])])


def gelu_erf(g: GraphBuilder, x: str) -> str:
    """The exact GELU, 0.5 x (1 + erf(x / sqrt(2))) (BERT's "gelu")."""
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5, np.float32)]),
                        g.op("Add", [g.op("Erf", [g.op("Div", [x, g.const(np.sqrt(2.0), np.float32)])]), g.const(1.0, np.float32)])])  # fmt: skip


def softcap(g: GraphBuilder, x: str, cap: float, ct) -> str:
    """cap * tanh(x / cap) (Gemma 2's attention scores and logits)."""
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, g.const(cap, ct)])]), g.const(cap, ct)])
