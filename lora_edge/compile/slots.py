"""Slot planning and adapter tensors: which LoRA branches the graph has, and an adapter as the tensors that bind them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..package.manifest import EMBEDDING
from .models import Slot
from .models.spec import BaseModel
from .peft import Adapter


def plan_slots(base: BaseModel, adapters: list[Adapter], family, fused: bool) -> dict[str, Slot]:
    """One slot per group of linear layers (q/k/v, gate/up, or one module) that any adapter targets."""
    biased = {m for a in adapters for m in a.bias_deltas}
    replaced = {m for a in adapters for m in a.replacements}
    wanted = {m for a in adapters for m in a.modules} | biased | replaced
    dora = {m for a in adapters for m, lora in a.modules.items() if lora.dora_scale is not None}
    lin = base.linear_modules
    slots = {
        name: Slot(name, lin[modules[0]].in_features, tuple((m, lin[m].out_features) for m in modules), dora=bool(dora & set(modules)),
                   bias=bool(biased & set(modules)), replace=modules == (name,) and name in replaced)  # fmt: skip
        for name, modules in family.groups(base.spec, fused)
        if wanted & set(modules)
    }
    if EMBEDDING in wanted:  # embedding LoRA: A is a (vocab, r) table gathered by token id, B is (r, dim)
        slots = {EMBEDDING: Slot(EMBEDDING, base.spec.vocab_size, ((EMBEDDING, base.spec.hidden_size),)), **slots}
    return slots


def adapter_tensors(adapter: Adapter, slots: dict[str, Slot]) -> dict[str, np.ndarray]:
    """The adapter as graph inputs: per slot, its modules' A side by side and their B chunked or block-diagonal.

    A module of the group that this adapter does not target contributes no rank (its columns of B
    stay zero); a slot none of whose modules it targets is not bound at all (the default is zero)."""
    out = {}
    for slot in slots.values():
        if slot.replace and slot.name in adapter.replacements:
            parts = adapter.replacements[slot.name]
            out[slot.weight_name] = np.ascontiguousarray(parts["weight"].T, np.float32)
            if "bias" in parts:
                out[slot.replaced_bias_name] = parts["bias"]
        if slot.bias and any(m in adapter.bias_deltas for m in slot.modules):
            out[slot.bias_name] = np.concatenate([adapter.bias_deltas.get(m, np.zeros(o, np.float32)) for m, o in slot.parts])
        mods = [(m, adapter.modules[m]) for m in slot.modules if m in adapter.modules]
        if not mods:
            continue
        if slot.chunk_width:
            out[slot.a_name], out[slot.b_name] = _chunked(slot, dict(mods))
        else:
            out[slot.a_name], out[slot.b_name] = _block_diagonal(slot, mods)
        if slot.dora and any(lora.dora_scale is not None for _, lora in mods):  # DoRA scales; ones for plain LoRA parts
            out[slot.m_name] = np.concatenate([
                adapter.modules[m].dora_scale if m in adapter.modules and adapter.modules[m].dora_scale is not None
                else np.ones(o, np.float32) for m, o in slot.parts])  # fmt: skip
    return out


def _block_diagonal(slot: Slot, mods: list) -> tuple[np.ndarray, np.ndarray]:
    """A: the targeted modules' A side by side (in, r); B: their B block-diagonal (r, sum(out))."""
    r = sum(lora.rank for _, lora in mods)
    a = np.concatenate([lora.a for _, lora in mods], axis=1)  # (in, r)
    b = np.zeros((r, slot.out_features), np.float32)  # (r, sum(out))
    offsets = dict(zip(slot.modules, np.cumsum([0] + [o for _, o in slot.parts])))
    row = 0
    for m, lora in mods:
        b[row : row + lora.rank, offsets[m] : offsets[m] + lora.b.shape[1]] = lora.b
        row += lora.rank
    return np.ascontiguousarray(a, np.float32), b


def _chunked(slot: Slot, mods: dict) -> tuple[np.ndarray, np.ndarray]:
    """A: every module's A side by side at one rank r_m (in, n*r_m), zero columns where the adapter ranks
    a module lower or skips it; B: (chunks, r_m, c), chunk j the columns of its module's B it produces."""
    r = max(lora.rank for lora in mods.values())
    c = slot.chunk_width
    a = np.zeros((slot.in_features, len(slot.parts) * r), np.float32)  # (in, n*r_m)
    b = np.zeros((len(slot.chunk_modules), r, c), np.float32)  # (chunks, r_m, c)
    first = 0  # the first chunk of module i
    for i, (m, out) in enumerate(slot.parts):
        lora = mods.get(m)
        if lora is not None:
            a[:, i * r : i * r + lora.rank] = lora.a
            for j in range(out // c):  # (r, out) -> its chunks of c columns
                b[first + j, : lora.rank] = lora.b[:, j * c : (j + 1) * c]
        first += out // c
    return a, b


def balanced(adapter: Adapter) -> Adapter:
    """The same adapter with each rank's A column and B row scaled to equal peaks (A s, B / s: the same
    product), so that float16 storage keeps both in its normal range: a trained B is often ~1e-4, near
    float16's smallest normal (6e-5), while A is ~1e-2."""
    mods = {}
    for name, m in adapter.modules.items():
        if m.embedding:
            mods[name] = m
            continue
        pa, pb = np.abs(m.a).max(axis=0), np.abs(m.b).max(axis=1)  # (r,), (r,)
        s = np.where((pa > 0) & (pb > 0), np.sqrt(pb / np.where(pa > 0, pa, 1)), 1.0).astype(np.float32)
        mods[name] = replace(m, a=(m.a * s[None, :]).astype(np.float32), b=(m.b / s[:, None]).astype(np.float32))
    return replace(adapter, modules=mods)


