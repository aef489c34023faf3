"""An adapter as a package's graph inputs: per LoRA slot, its modules' A side by side and their B chunked or
block-diagonal (the layout lora_edge.compile.models.spec.Slot describes), and what each input's shape must be."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from ..package.manifest import SlotInfo
from .peft import Adapter

# An expected shape: an int is a fixed size, "r" the slot's rank, "r/N" the rank per module of a chunked B
# (N modules), "bytes" a blob's length.
Shape = tuple[int | str, ...]


def slot_tensors(adapter: Adapter, slots: Sequence[SlotInfo]) -> dict[str, np.ndarray]:
    """The adapter as float32 graph inputs. A module of a group that the adapter does not target contributes no rank
    (its columns of B stay zero); a slot none of whose modules it targets is not bound at all (its default is zero)."""
    out = {}
    for slot in slots:
        modules = [p.module for p in slot.parts]
        if slot.weight and slot.name in adapter.replacements:
            parts = adapter.replacements[slot.name]
            out[slot.weight] = np.ascontiguousarray(parts["weight"].T, np.float32)  # (in, out)
            if "bias" in parts:
                out[slot.bias_in] = parts["bias"]
        if slot.lora_bias and any(m in adapter.bias_deltas for m in modules):
            out[slot.lora_bias] = np.concatenate([adapter.bias_deltas.get(p.module, np.zeros(p.out_features, np.float32))
                                                  for p in slot.parts])  # fmt: skip
        mods = [(m, adapter.modules[m]) for m in modules if m in adapter.modules]
        if not mods:
            continue
        if slot.lora_B_chunks:
            out[slot.lora_A], out[slot.lora_B] = _chunked(slot, dict(mods))
        else:
            out[slot.lora_A], out[slot.lora_B] = _block_diagonal(slot, mods)
        if slot.lora_M and any(lora.dora_scale is not None for _, lora in mods):  # DoRA scales; ones for plain LoRA parts
            out[slot.lora_M] = np.concatenate([
                adapter.modules[p.module].dora_scale if p.module in adapter.modules and adapter.modules[p.module].dora_scale is not None
                else np.ones(p.out_features, np.float32) for p in slot.parts])  # fmt: skip
    return out


def _block_diagonal(slot: SlotInfo, mods: list) -> tuple[np.ndarray, np.ndarray]:
    """A: the targeted modules' A side by side (in, r); B: their B block-diagonal (r, sum(out))."""
    r = sum(lora.rank for _, lora in mods)
    a = np.concatenate([lora.a for _, lora in mods], axis=1)  # (in, r)
    b = np.zeros((r, slot.out_features), np.float32)  # (r, sum(out))
    offsets = dict(zip([p.module for p in slot.parts], np.cumsum([0] + [p.out_features for p in slot.parts])))
    row = 0
    for m, lora in mods:
        b[row : row + lora.rank, offsets[m] : offsets[m] + lora.b.shape[1]] = lora.b
        row += lora.rank
    return np.ascontiguousarray(a, np.float32), b


def _chunked(slot: SlotInfo, mods: dict) -> tuple[np.ndarray, np.ndarray]:
    """A: every module's A side by side at one rank r_m (in, n*r_m), zero columns where the adapter ranks a module
    lower or skips it; B: (chunks, r_m, c), chunk j the columns of its module's B it produces."""
    r = max(lora.rank for lora in mods.values())
    c = slot.lora_B_chunks.width
    a = np.zeros((slot.in_features, len(slot.parts) * r), np.float32)  # (in, n*r_m)
    b = np.zeros((len(slot.lora_B_chunks.modules), r, c), np.float32)  # (chunks, r_m, c)
    first = 0  # the first chunk of module i
    for i, part in enumerate(slot.parts):
        lora = mods.get(part.module)
        if lora is not None:
            a[:, i * r : i * r + lora.rank] = lora.a
            for j in range(part.out_features // c):  # (r, out) -> its chunks of c columns
                b[first + j, : lora.rank] = lora.b[:, j * c : (j + 1) * c]
        first += part.out_features // c
    return a, b


def balanced(adapter: Adapter) -> Adapter:
    """The same adapter with each rank's A column and B row scaled to equal peaks (A s, B / s: the same product), so
    that float16 storage keeps both in its normal range: a trained B is often ~1e-4, near float16's smallest normal
    (6e-5), while A is ~1e-2."""
    mods = {}
    for name, m in adapter.modules.items():
        if m.embedding:
            mods[name] = m
            continue
        pa, pb = np.abs(m.a).max(axis=0), np.abs(m.b).max(axis=1)  # (r,), (r,)
        s = np.where((pa > 0) & (pb > 0), np.sqrt(pb / np.where(pa > 0, pa, 1)), 1.0).astype(np.float32)
        mods[name] = replace(m, a=(m.a * s[None, :]).astype(np.float32), b=(m.b / s[:, None]).astype(np.float32))
    return replace(adapter, modules=mods)


def slot_shapes(slots: Sequence[SlotInfo], blob_name: str | None = None) -> dict[str, tuple[str, Shape]]:
    """Every overridable input of the package's ``slots``: name -> (slot, expected shape)."""
    out: dict[str, tuple[str, Shape]] = {}
    for s in slots:
        n, o = s.name, s.out_features
        out[s.lora_A] = (n, (s.in_features, "r"))
        chunks = s.lora_B_chunks
        out[s.lora_B] = (n, (len(chunks.modules), f"r/{len(s.parts)}", chunks.width) if chunks else ("r", o))
        if s.lora_blob is not None:  # w8a8: its A, B and scales are its part of the one blob
            del out[s.lora_A], out[s.lora_B]
            out[blob_name] = ("w8a8 blob", ("bytes",))
        elif s.lora_A_scale:  # int8 A/B (native kernel): one scale per column of A, per row of B
            out[s.lora_A_scale] = (n, ("r",))
            out[s.lora_B_scale] = (n, out[s.lora_B][1][:-1])
        if s.weight:  # a module adapters may replace (modules_to_save): (in, out) and its bias
            out[s.weight] = (n, (s.in_features, o))
            out[s.bias_in] = (n, (o,))
        for name in (s.lora_M, s.lora_bias):  # per-output-channel vectors (DoRA scale, trained bias change)
            if name:
                out[name] = (n, (o,))
    return out


def ranked_shapes(slot: SlotInfo, rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of a slot's lora_A and lora_B for an adapter of ``rank`` on each of its modules."""
    chunks = slot.lora_B_chunks
    if chunks:
        n = len(slot.parts)
        return {slot.lora_A: (slot.in_features, n * rank), slot.lora_B: (len(chunks.modules), rank, chunks.width)}
    return {slot.lora_A: (slot.in_features, rank), slot.lora_B: (rank, slot.out_features)}
