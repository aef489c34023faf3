"""The token embedding: rows of the table gathered by token id (a quantized table's rows dequantized in the graph),
plus the embedding's LoRA."""

from __future__ import annotations

import numpy as np

from ...package.manifest import EMBEDDING, ROW_MASK
from ..models.spec import Slot
from ..quant.blocks import QTensor
from .builder import GraphBuilder
from .options import GraphOptions
from .weights import EMBED_WEIGHT, WeightStore


def token_embedding(g: GraphBuilder, store: WeightStore, options: GraphOptions, weights: dict, slots: dict[str, Slot],
                    ids: str) -> tuple[str, str | None]:  # fmt: skip
    """(the rows of ``ids`` with their LoRA delta, the float table's value or None): a tied head reads the same
    table, never a transposed copy."""
    table = weights[EMBED_WEIGHT]
    if isinstance(table, QTensor):
        value, rows = None, quantized_rows(g, store, options, EMBED_WEIGHT, table, ids)
    else:
        value = store.float(EMBED_WEIGHT, table)
        rows = g.op("Gather", [value, ids], axis=0)
    slot = slots.get(EMBEDDING)
    if slot is not None:  # A is a (vocab, r) table: its rows gathered by token id, then @ B
        with g.scoped(f"lora/{EMBEDDING}"):
            xa = g.op("Gather", [slot.a_name, ids], axis=0)  # (B, S, r)
            if options.row_mask:  # mixed-adapter batches, as every branch (branch.OnnxBranch.rows)
                xa = g.op("Mul", [xa, ROW_MASK])
            delta = g.op("MatMul", [xa, slot.b_name])
            rows = g.op("Add", [rows, delta])
    return rows, value


def quantized_rows(g: GraphBuilder, store: WeightStore, options: GraphOptions, name: str, qt: QTensor, ids: str) -> str:
    """Rows of a quantized table: codes, scales and zero points of the ids gathered, then dequantized.

    Only the looked-up rows are dequantized, with standard ops, so a tied head shares the very same MatMulNBits
    initializers (one quantized copy of the table serves both)."""
    v, ct, nb = store.quantized(name, qt), options.ct, qt.n_blocks
    codes = g.op("Gather", [v.codes, ids], axis=0)  # (B, S, nb, blob) uint8
    q = _unpack(g, options, codes, qt.bits, qt.block)  # (B, S, nb, block)
    if v.zero_points is None:
        zp = g.const(2.0 ** (qt.bits - 1), ct)
    else:
        packed = g.op("Gather", [v.zero_points, ids], axis=0)  # (B, S, ceil(nb * bits / 8)) uint8
        zp = g.op("Unsqueeze", [_unpack(g, options, packed, qt.bits, nb), g.const([-1])])  # (B, S, nb, 1)
    scale = g.op("Gather", [v.scales, ids], axis=0)  # (B, S, nb)
    if v.half_scales:
        scale = g.op("Cast", [scale], to=options.onnx_ct)
    scale = g.op("Unsqueeze", [scale, g.const([-1])])  # (B, S, nb, 1)
    rows = g.op("Mul", [g.op("Sub", [q, zp]), scale])  # (B, S, nb, block)
    if v.offsets is not None:
        rows = g.op("Add", [rows, g.op("Unsqueeze", [g.op("Gather", [v.offsets, ids], axis=0), g.const([-1])])])
    rows = g.op("Reshape", [rows, g.const([0, 0, -1])])  # (B, S, nb*block)
    if nb * qt.block != qt.k:
        rows = g.op("Slice", [rows, g.const([0]), g.const([qt.k]), g.const([-1])])  # (B, S, K)
    return rows


def _unpack(g: GraphBuilder, options: GraphOptions, p: str, bits: int, length: int) -> str:
    """uint8 codes (.., bytes) -> float (.., length): at 4 bits two codes per byte, low nibble first."""
    if bits == 8:
        return g.op("Cast", [p], to=options.onnx_ct)
    high = g.op("BitShift", [p, g.const(4, np.uint8)], direction="RIGHT")
    low = g.op("Sub", [p, g.op("BitShift", [high, g.const(4, np.uint8)], direction="LEFT")])
    both = g.op("Concat", [g.op("Unsqueeze", [t, g.const([-1])]) for t in (low, high)], axis=-1)  # (.., bytes, 2)
    shape = g.op("Concat", [g.op("Slice", [g.op("Shape", [p]), g.const([0]), g.const([-1])]), g.const([-1])], axis=0)  # [.., -1]
    flat = g.op("Reshape", [both, shape])  # (.., 2 * bytes)
    return g.op("Cast", [g.op("Slice", [flat, g.const([0]), g.const([length]), g.const([-1])])], to=options.onnx_ct)
