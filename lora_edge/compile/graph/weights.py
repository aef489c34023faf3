"""The base weights as initializers, each written once under its HF name (a tied head and the embedding share one
quantized copy), in the layout and dtype the node that reads it wants."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...package.manifest import EMBEDDING
from ..quant.blocks import QTensor, pack_q4, packs_q8
from .builder import GraphBuilder
from .options import GraphOptions

EMBED_WEIGHT = f"{EMBEDDING}.weight"


class QuantWeight(NamedTuple):
    """The values of a block-quantized weight in MatMulNBits' layout (see lora_edge.compile.quant.blocks)."""

    codes: str  # (N, n_blocks, block*bits/8) uint8
    scales: str  # (N, n_blocks), in the compute dtype; float16 in a Q8_0 table (half_scales)
    zero_points: str | None  # (N, ceil(n_blocks*bits/8)) uint8, zero="int" only
    offsets: str | None  # (N, n_blocks): the embedding's, whose rows are gathered
    offsets_t: str | None  # (n_blocks, N): another weight's, the right operand of the correction's MatMul
    half_scales: bool = False  # a Q8_0 table: MatMulQ8 reads the float16 scales, gathered rows are cast after the Gather


class WeightStore:
    def __init__(self, g: GraphBuilder, options: GraphOptions) -> None:
        self.g, self.options = g, options
        self._quantized: dict[str, QuantWeight] = {}
        self._packed: dict[str, str] = {}

    def float(self, name: str, arr: np.ndarray) -> str:
        """A float initializer; with ``store_fp16`` stored as float16 and cast up once at load."""
        ct = self.options.ct
        if not self.options.store_fp16 or ct is np.float16:
            return self.g.weight(name, arr.astype(ct))
        return self.g.op("Cast", [self.g.weight(f"{name}.fp16", arr.astype(np.float16))], to=1)

    def quantized(self, name: str, qt: QTensor) -> QuantWeight:
        """MatMulNBits' inputs of ``qt``, plus its float offsets when the blocks have them."""
        if name in self._quantized:
            return self._quantized[name]
        g, ct = self.g, self.options.onnx_ct
        codes = g.weight(f"{name}.q{qt.bits}", qt.codes)
        scales = g.weight(f"{name}.scales", qt.scales)
        half_scales = packs_q8(qt) and self.options.native  # MatMulQ8's (a whole cast would be a float32 heap copy)
        if qt.scales.dtype != self.options.ct and not half_scales:  # float16 on disk with float offsets
            scales = g.op("Cast", [scales], to=ct)
        zero_points = g.weight(f"{name}.zero_points", qt.zero_points) if qt.zero_points is not None else None
        offsets = offsets_t = None
        if qt.offsets is not None and name == EMBED_WEIGHT:
            offsets = g.op("Cast", [g.weight(f"{name}.offsets", qt.offsets)], to=ct)
        elif qt.offsets is not None:  # transposed: the right operand of a MatMul, which ORT can prepack
            offsets_t = g.weight(f"{name}.offsets.T", np.ascontiguousarray(qt.offsets.T))
            if not self.options.native:  # the native kernel reads them as float16
                offsets_t = g.op("Cast", [offsets_t], to=ct)
        self._quantized[name] = QuantWeight(codes, scales, zero_points, offsets, offsets_t, half_scales)
        return self._quantized[name]

    def packed(self, name: str, qt: QTensor) -> str:
        """``qt`` in the native kernel's MatMulQ4 layout: one record of codes, scales and offsets per 16 columns
        and block."""
        if name not in self._packed:
            self._packed[name] = self.g.weight(f"{name}.q4x", pack_q4(qt))
        return self._packed[name]
