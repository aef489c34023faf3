"""Merge mode: an adapter folded into the base weights in float32 (PEFT's merge_and_unload), before quantization."""

from __future__ import annotations

import numpy as np

from ..package.manifest import EMBEDDING
from .models.spec import BaseModel
from ..adapters.peft import Adapter


def merged_weights(base: BaseModel, adapter: Adapter) -> dict[str, np.ndarray]:
    """W + s*B*A (DoRA: g * (W + s*B*A)) in float32 for every adapted module (PEFT's merge_and_unload)."""
    weights = dict(base.weights)
    for module, delta in adapter.bias_deltas.items():
        weights[f"{module}.bias"] = (weights[f"{module}.bias"] + delta).astype(np.float32)
    for module, parts in adapter.replacements.items():  # modules_to_save: the adapter's own copy
        for part, arr in parts.items():
            weights[f"{module}.{part}"] = arr
    for module, lora in adapter.modules.items():
        key = f"{module}.weight"
        if key not in weights and module == "lm_head":  # tied head: merging unties it
            weights[key] = base.weight_of(module)
        if module == EMBEDDING and base.spec.tie_word_embeddings and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights[key]  # the head keeps the embedding it had: untie (PEFT's merge would not)
        weights[key] = lora.merged(weights[key])
    return weights
