"""Calibration for GPTQ (compile side): the input statistics H = X^T X of every linear layer.

The float PyTorch model runs once over the user's calibration text; a forward pre-hook on each
target ``nn.Linear`` accumulates X^T X in float64. Layers that read the same input (q/k/v, gate/up)
share one matrix, computed once per chunk; the forward stops as soon as every hooked layer has seen
its input (the logits are not needed; each linear layer of the families lora-edge reads runs once per
forward, so nothing is cut short).
"""

from __future__ import annotations

from importlib import resources
from typing import Callable

import numpy as np

from ...errors import InputError


def default_calibration_text() -> str:
    return resources.files("lora_edge").joinpath("data/calibration_text.txt").read_text(encoding="utf-8")


class _Seen(Exception):
    """Raised from the last hook of a forward pass: the rest of the model (the head's logits) is not needed."""


def collect_hessians(hf_model, token_ids: list[int], modules: list[str], chunk: int = 512,
                     step: Callable[[int, int], None] = lambda done, total: None) -> dict[str, np.ndarray]:  # fmt: skip
    """H = X^T X / T of each module's input, float64; modules reading the same input get the same array.
    ``step(done, total)`` follows the tokens run."""
    import torch

    if len(token_ids) < 64:
        raise InputError(f"the calibration text has only {len(token_ids)} tokens; give at least 64 (a few paragraphs)")
    named = dict(hf_model.named_modules())
    hooked = [m for m in modules if m in named]
    sums: dict[str, np.ndarray] = {}
    leader: dict[str, str] = {}  # module -> the first module seen reading the same input tensor
    counts: dict[str, int] = {}
    last: list = [None, None, None]  # (input tensor, its X^T X, the module that computed it) of the latest hook
    fired: set[str] = set()

    def hook_for(name):
        def hook(_module, inputs):
            if inputs[0] is last[0]:  # q/k/v, gate/up: the same tensor, the same product
                h = last[1]
                leader.setdefault(name, last[2])
            else:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (T, K)
                h = (x.T @ x).numpy()
                last[:] = inputs[0], h, name
                leader.setdefault(name, name)
            if leader[name] == name:
                sums[name] = sums.get(name, 0) + h
                counts[name] = counts.get(name, 0) + inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]
            fired.add(name)
            if len(fired) == len(hooked):
                raise _Seen

        return hook

    handles = [named[m].register_forward_pre_hook(hook_for(m)) for m in hooked]
    try:
        with torch.no_grad():
            for start in range(0, len(token_ids), chunk):
                fired.clear()
                last[:] = None, None, None
                try:
                    hf_model(torch.tensor([token_ids[start : start + chunk]]))
                except _Seen:
                    pass
                step(min(start + chunk, len(token_ids)), len(token_ids))
    finally:
        for h in handles:
            h.remove()
    means = {m: s / counts[m] for m, s in sums.items()}
    return {m: means[leader[m]] for m in hooked if m in leader}
