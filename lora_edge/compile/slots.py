"""Slot planning: which LoRA branches the graph has (lora_edge.adapters.layout lays an adapter out on them)."""

from __future__ import annotations

from ..package.manifest import EMBEDDING
from .models import Slot
from .models.spec import BaseModel
from ..adapters.peft import Adapter


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
