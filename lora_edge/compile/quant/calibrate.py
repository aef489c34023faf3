"""Calibration for GPTQ (compile side): the input statistics H = X^T X of every linear layer.

The float PyTorch model runs once over the user's calibration text; a forward pre-hook on each
target ``nn.Linear`` accumulates X^T X in float64. Layers that share an input (q/k/v, gate/up) get
equal matrices, computed once each (cheap next to the forward pass).
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ...errors import InputError


def default_calibration_text() -> str:
    return resources.files("lora_edge").joinpath("data/calibration_text.txt").read_text(encoding="utf-8")


def collect_hessians(hf_model, token_ids: list[int], modules: list[str], chunk: int = 512) -> dict[str, np.ndarray]:
    import torch

    if len(token_ids) < 64:
        raise InputError(f"the calibration text has only {len(token_ids)} tokens; give at least 64 (a few paragraphs)")
    named = dict(hf_model.named_modules())
    hessians: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (T, K)
            h = (x.T @ x).numpy()
            hessians[name] = hessians.get(name, 0) + h
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for m in modules:
        if m in named:
            handles.append(named[m].register_forward_pre_hook(hook_for(m)))
    try:
        with torch.no_grad():
            for start in range(0, len(token_ids), chunk):
                hf_model(torch.tensor([token_ids[start : start + chunk]]))
    finally:
        for h in handles:
            h.remove()
    return {m: h / counts[m] for m, h in hessians.items()}
