"""The graph inputs an adapter overrides, with the defaults that compute the base: per slot its branch's A and B
(branch.py), DoRA's magnitude, the change of a trained bias, a replaced module's weight; and a w8a8 package's
one blob."""

from __future__ import annotations

import numpy as np

from ...native.contract import W8A8_BLOB
from ...native.encode import w8a8_blob
from ...package.manifest import ALORA_MASK, ROW_MASK, ROW_MASK_CHUNKS
from ..models.spec import Slot
from .blob import blob_geometry
from .branch import Branches, Inputs


def adapter_inputs(slots: dict[str, Slot], weights: dict, branches: Branches, null_rank: int, ct) -> Inputs:
    """name -> (default, symbolic shape), in the order of the graph's inputs."""
    out: Inputs = {}
    for slot in slots.values():
        out.update(branches[slot].inputs(slot, null_rank))
        if slot.dora:  # g = 1: plain LoRA
            out[slot.m_name] = (np.ones(slot.out_features, ct), [slot.out_features])
        if slot.bias:
            out[slot.bias_name] = (np.zeros(slot.out_features, ct), [slot.out_features])
        if slot.replace:
            w = weights[f"{slot.name}.weight"]
            out[slot.weight_name] = (np.ascontiguousarray(w.T).astype(ct), [slot.in_features, slot.out_features])
            if f"{slot.name}.bias" in weights:
                out[slot.replaced_bias_name] = (np.asarray(weights[f"{slot.name}.bias"]).astype(ct), [slot.out_features])
    if branches.onnx.alora:  # ones: every position adapted, as plain LoRA
        out[ALORA_MASK] = (np.ones((1, 1, 1), ct), ["alora_batch", "alora_sequence", 1])
    if branches.onnx.row_mask:  # ones: every row takes every column of A, as a single adapter's call
        out[ROW_MASK] = (np.ones((1, 1, 1), ct), ["row_batch", 1, "row_rank"])
        if any(s.chunk_width for s in slots.values()):
            out[ROW_MASK_CHUNKS] = (np.ones((1, 1, 1, 1, 1), ct), ["row_batch", 1, 1, 1, "row_rank"])
    if branches.blob:  # every q8x branch's part, all empty (rank 0)
        out[W8A8_BLOB] = (w8a8_blob([(blob_geometry(s), None) for s in branches.blob]), ["w8a8_bytes"])
    return out
