"""Projection emitters: y = x @ W.T for one kind of stored weight, returned as the terms of a sum (terms.py).

- :class:`FloatProjection`: a MatMul against the transposed float weight;
- :class:`NBitsProjection`: ONNX Runtime's MatMulNBits (int4/int8 blocks, with int, implied or float zero points),
  plus the float-offset correction blocksum(x) @ offsets.T in standard ops;
- :class:`NativeNBitsProjection`: the same, its correction left to the native kernel (an :class:`OffsetTerm`);
- :class:`Q4Projection`: the native kernel's own int4 product (a :class:`PackedTerm`, offsets included);
- :class:`Q8Projection`: the native kernel's MatMulQ8 on a Q8_0 table where it lies (the output head).

:class:`Projections` holds the ones the options allow and picks one per weight.
"""

from __future__ import annotations

import numpy as np

from ..models.spec import Slot
from ...native.contract import DOMAIN, Feature, Op
from ..quant.blocks import QTensor, packs_q4, packs_q8
from .builder import GraphBuilder
from .options import GraphOptions
from .terms import OffsetTerm, PackedTerm, Term
from .weights import EMBED_WEIGHT, WeightStore


class FloatProjection:
    def __init__(self, g: GraphBuilder, store: WeightStore) -> None:
        self.g, self.store = g, store

    def terms(self, x: str, weight: str, w: np.ndarray) -> list[Term]:
        return [self.g.op("MatMul", [x, self.store.float(f"{weight}.T", w.T)])]  # (in, out)


class NBitsProjection:
    """MatMulNBits (weight-only, block-wise); MatMulNBits has no float offsets, so blocks that have them add the
    correction blocksum(x) @ offsets.T, 1/block of the main product's work."""

    def __init__(self, g: GraphBuilder, store: WeightStore, accuracy_level: int) -> None:
        self.g, self.store, self.accuracy_level = g, store, accuracy_level
        self._block_sums: dict[tuple[str, int], str] = {}  # (x, block) -> blocksum(x), shared by the projections of x

    def terms(self, x: str, weight: str, qt: QTensor) -> list[Term]:
        g, v = self.g, self.store.quantized(weight, qt)
        ins = [x, v.codes, v.scales] + ([v.zero_points] if v.zero_points is not None else [])
        y = g.op("MatMulNBits", ins, domain="com.microsoft", K=qt.k, N=qt.n, bits=qt.bits, block_size=qt.block,
                 accuracy_level=self.accuracy_level)  # fmt: skip
        if v.offsets_t is not None:
            return [y, self.correction(x, v.offsets_t, qt)]
        if v.offsets is None:
            return [y]
        # a tied head reads the embedding's offsets in their gathered (N, nb) layout
        flat = g.op("Reshape", [self.block_sums(x, qt), g.const([-1, qt.n_blocks])])  # (B*S, nb)
        return [y, g.op("Reshape", [g.op("Gemm", [flat, v.offsets], transB=1), g.op("Shape", [y])])]  # (B, S, V)

    def correction(self, x: str, offsets_t: str, qt: QTensor) -> Term:
        return self.g.op("MatMul", [self.block_sums(x, qt), offsets_t])  # (B, S, N)

    def block_sums(self, x: str, qt: QTensor) -> str:
        """(B, S, n_blocks): the sum of x over each block of K (K zero-padded to whole blocks)."""
        key = (x, qt.block)
        if key not in self._block_sums:
            g, xp = self.g, x
            if qt.n_blocks * qt.block != qt.k:
                xp = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, qt.n_blocks * qt.block - qt.k])])
            blocks = g.op("Reshape", [xp, g.const([0, 0, qt.n_blocks, qt.block])])  # (B, S, nb, block)
            self._block_sums[key] = g.op("ReduceSum", [blocks, g.const([-1])], keepdims=0)  # (B, S, nb)
        return self._block_sums[key]


class NativeNBitsProjection(NBitsProjection):
    """MatMulNBits, with the float-offset correction run by the native kernel: in the node of the layer's branch
    when it has one (no extra pass over x), else a BlockOffset node (terms.sum_terms)."""

    def correction(self, x: str, offsets_t: str, qt: QTensor) -> Term:
        return OffsetTerm(x, offsets_t, qt.block)


class Q4Projection:
    """The native kernel's MatMulQ4 on its packed int4 layout, offsets included."""

    def __init__(self, store: WeightStore) -> None:
        self.store = store

    def terms(self, x: str, weight: str, qt: QTensor) -> list[Term]:
        return [PackedTerm(x, self.store.packed(weight, qt), qt.k, qt.n)]


class Q8Projection:
    """The native kernel's MatMulQ8 on a Q8_0 table (quantize_q8_0), read from the initializers the embedding's rows
    are gathered from: one mapped copy, none prepacked."""

    def __init__(self, g: GraphBuilder, store: WeightStore) -> None:
        self.g, self.store = g, store

    def terms(self, x: str, weight: str, qt: QTensor) -> list[Term]:
        v = self.store.quantized(weight, qt)
        self.g.need(Feature.MATMUL_Q8)
        return [self.g.op(Op.MATMUL_Q8, [x, v.codes, v.scales], domain=DOMAIN, K=qt.k, N=qt.n)]


class Projections:
    def __init__(self, g: GraphBuilder, options: GraphOptions, store: WeightStore, slots: dict[str, Slot]) -> None:
        self.g, self.slots = g, slots
        self.float = FloatProjection(g, store)
        self.nbits = (NativeNBitsProjection if options.native else NBitsProjection)(g, store, options.accuracy_level)
        # MatMulQ4 computes as MatMulNBits does at accuracy level 4 (int8 activations): the same numbers
        self.q4 = Q4Projection(store) if options.native and options.accuracy_level == 4 else None
        self.q8 = Q8Projection(g, store) if options.native else None

    def terms(self, x: str, name: str, w: np.ndarray | QTensor) -> list[Term]:
        """The terms of module ``name``'s projection of ``x``."""
        slot = self.slots.get(name)
        if slot is not None and slot.replace:  # the weight is an input: adapters may replace the module
            return [self.g.op("MatMul", [x, slot.weight_name])]
        if isinstance(w, QTensor):
            return self.quantized(x, f"{name}.weight", w)
        return self.float.terms(x, f"{name}.weight", w)

    def quantized(self, x: str, weight: str, qt: QTensor) -> list[Term]:
        # not the embedding table: the graph gathers and dequantizes its rows from MatMulNBits' layout
        if self.q4 is not None and packs_q4(qt) and weight != EMBED_WEIGHT:
            return self.q4.terms(x, weight, qt)
        if self.q8 is not None and packs_q8(qt):
            return self.q8.terms(x, weight, qt)
        return self.nbits.terms(x, weight, qt)
