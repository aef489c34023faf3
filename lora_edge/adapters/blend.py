"""Adapters at a strength, and blends of adapters, as one set of graph inputs: no graph change where the rank is
symbolic. A blend of adapters i with weights w_i is one branch per slot whose rank is the sum of theirs: A = [A_1 ...
A_n] concatenated along the rank and B = [w_1 B_1; ...; w_n B_n] (each B holds its adapter's scaling already), so the
delta is sum_i w_i s_i B_i A_i, PEFT's ``add_weighted_adapter(..., combination_type="cat")``. A strength alone is the
blend of one adapter. int8 and w8a8 storage concatenate their codes and scale B's scales: no requantization."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import RuntimeInputError
from ..native.contract import W8A8_BLOB
from ..native.encode import pack_blob, q8x_rows, unpack_blob
from ..package.manifest import SlotInfo
from .storage import Storage

Tensors = Mapping[str, np.ndarray]


def check_linear(name: str, tensors: Tensors, storage: Storage) -> None:
    """Refuse an adapter whose delta is not a sum over its ranks (DoRA, a replaced module), naming the slot."""
    fixed = [s.name for s in storage.slots if any(t in tensors for t in (s.lora_M, s.weight))]
    if fixed:
        raise RuntimeInputError(f"adapter {name!r} is DoRA or replaces a module on {fixed[0]}; it runs only alone at "
                                "scale 1 (its delta is not linear in its weights)")  # fmt: skip


def blend(parts: Sequence[tuple[str, Tensors, float]], storage: Storage) -> dict[str, np.ndarray]:
    """The graph inputs of sum_i w_i * adapter_i; ``parts``: (name, stored tensors, w) per adapter."""
    for name, tensors, _ in parts:
        check_linear(name, tensors, storage)
    out: dict[str, np.ndarray] = {}
    for slot in storage.slots:
        out.update(_slot(slot, parts))
    if storage.blob:
        out[W8A8_BLOB] = _blob(parts, storage)
    return out


def _slot(slot: SlotInfo, parts: Sequence[tuple[str, Tensors, float]]) -> dict[str, np.ndarray]:
    bound = [(t, w) for _, t, w in parts if slot.lora_A in t]
    out = {}
    if bound:
        n = len(slot.parts) if slot.lora_B_chunks else 1  # A's columns: one block of ranks per module
        b_axis = 1 if slot.lora_B_chunks else 0  # B's rows: the rank axis, per chunk when chunked
        out[slot.lora_A] = _concat([t[slot.lora_A] for t, _ in bound], axis=1, blocks=n)
        if slot.lora_A_scale:  # int8: the codes as they are, each rank's scale with them; w scales B's scales
            out[slot.lora_A_scale] = _concat([t[slot.lora_A_scale] for t, _ in bound], axis=0, blocks=n)
            out[slot.lora_B] = _concat([t[slot.lora_B] for t, _ in bound], axis=b_axis, blocks=1)
            out[slot.lora_B_scale] = _concat([_scaled(t[slot.lora_B_scale], w) for t, w in bound], axis=b_axis, blocks=1)
        else:
            out[slot.lora_B] = _concat([_scaled(t[slot.lora_B], w) for t, w in bound], axis=b_axis, blocks=1)
    if slot.lora_bias and any(slot.lora_bias in t for _, t, _ in parts):  # additive: the weighted sum
        out[slot.lora_bias] = sum(_scaled(t[slot.lora_bias], w) for _, t, w in parts if slot.lora_bias in t)
    return out


def _blob(parts: Sequence[tuple[str, Tensors, float]], storage: Storage) -> np.ndarray:
    by_a = {s.lora_A: s for s in storage.slots}
    k_rows = [q8x_rows(by_a[a].in_features) for a, _, _, _ in storage.blob]
    unpacked = [(unpack_blob(t[W8A8_BLOB], k_rows), w) for _, t, w in parts if W8A8_BLOB in t]
    branches = []
    for i, (a_name, _, chunks, c) in enumerate(storage.blob):
        bound = [(branches_i[i][1], w) for branches_i, w in unpacked if branches_i[i][1] is not None]
        if not bound:
            branches.append(((chunks, c), None))
            continue
        n = len(by_a[a_name].parts) if by_a[a_name].lora_B_chunks else 1
        qa = _concat([q[0] for q, _ in bound], axis=1, blocks=n)  # (K/4, n * r4, 4)
        sa = _concat([q[1] for q, _ in bound], axis=0, blocks=n)
        qb = _concat([q[2] for q, _ in bound], axis=1, blocks=1)  # (chunks, r4 / 4, c, 4)
        sb = _concat([_scaled(q[3], w) for q, w in bound], axis=1, blocks=1)  # (chunks, r4)
        branches.append(((chunks, c), (qa, sa, qb, sb)))
    return pack_blob(branches)


def stack(parts: Sequence[tuple[str, Tensors]], storage: Storage) -> tuple[dict[str, np.ndarray], int]:
    """A bank of ``parts`` (name, stored float tensors) for mixed-adapter batches, and its rank per part R: in every slot
    part i owns the columns [i R, (i + 1) R) of A (of each module's block, when chunked) and the same rows of B, padded
    with zeros (a part without the slot is all zeros there). A row that keeps only part i's columns (the graph's row
    mask) computes exactly part i's delta. Every slot is bound, so that every A has the mask's width."""
    for name, tensors in parts:
        check_linear(name, tensors, storage)
        if any(s.lora_bias in tensors for s in storage.slots if s.lora_bias):
            raise RuntimeInputError(f"adapter {name!r} trains a bias, which is not a sum over its ranks; it runs only in "
                                    "batches of its own")  # fmt: skip
    slots = [s for s in storage.slots if s.lora_A]
    rank = max([_module_rank(s, t) for s in slots for _, t in parts if s.lora_A in t] + [1])
    dtype = np.dtype(storage.dtype)
    out: dict[str, np.ndarray] = {}
    for slot in slots:
        n = len(slot.parts) if slot.lora_B_chunks else 1
        chunks = len(slot.lora_B_chunks.modules) if slot.lora_B_chunks else 0
        b_rows = (chunks, 0, slot.lora_B_chunks.width) if chunks else (0, slot.out_features)
        a_parts, b_parts = [], []
        for _, t in parts:
            a = t.get(slot.lora_A, np.zeros((slot.in_features, 0), dtype))  # (in, n * r_m)
            b = t.get(slot.lora_B, np.zeros(b_rows, dtype))  # (r, out) or (chunks, r_m, c)
            pad = rank - a.shape[1] // n
            a_parts.append(np.concatenate([np.pad(m, ((0, 0), (0, pad))) for m in np.split(a, n, axis=1)], axis=1))
            b_parts.append(np.pad(b, [(0, pad) if ax == b.ndim - 2 else (0, 0) for ax in range(b.ndim)]))
        out[slot.lora_A] = _concat(a_parts, axis=1, blocks=n)
        out[slot.lora_B] = _concat(b_parts, axis=b_parts[0].ndim - 2, blocks=1)
    return out, rank


def _module_rank(slot: SlotInfo, tensors: Tensors) -> int:
    return tensors[slot.lora_A].shape[1] // (len(slot.parts) if slot.lora_B_chunks else 1)


def _scaled(x: np.ndarray, w: float) -> np.ndarray:
    return x if w == 1 else (x.astype(np.float32) * np.float32(w)).astype(x.dtype)


def _concat(arrays: list[np.ndarray], axis: int, blocks: int) -> np.ndarray:
    """Concatenate along ``axis``, where each array's axis is ``blocks`` equal blocks (a module's ranks each): block m
    of every array, then block m + 1, ..."""
    if len(arrays) == 1:
        return np.ascontiguousarray(arrays[0])
    split = [np.split(a, blocks, axis=axis) for a in arrays]
    return np.ascontiguousarray(np.concatenate([s[m] for m in range(blocks) for s in split], axis=axis))
