"""A graph's linear layers: the base projection (projection.py), the slot's LoRA delta (branch.py) and the bias,
summed in as few nodes as the kernel allows; modules that read the same input run as one projection."""

from __future__ import annotations

import numpy as np

from ..models.spec import Slot
from ..quant.blocks import QTensor
from .branch import Branches
from .builder import GraphBuilder
from .projection import Projections
from .terms import Term, sum_terms


class Linear:
    def __init__(self, g: GraphBuilder, weights: dict, slots: dict[str, Slot], projections: Projections, branches: Branches,
                 ct) -> None:  # fmt: skip
        self.g, self.weights, self.slots, self.ct = g, weights, slots, ct
        self.projections, self.branches = projections, branches

    def group(self, x: str, group: str, modules: tuple[str, ...]) -> list[str]:
        """The outputs of ``modules`` (which all read ``x``), one matmul when their formats agree."""
        g, slot = self.g, self.slots.get(group)
        ws = [self.weights[f"{m}.weight"] for m in modules]
        sizes = [w.n if isinstance(w, QTensor) else w.shape[0] for w in ws]
        if len(ws) > 1 and not _concatenable(ws):
            return self._apart(x, group, modules, ws, sizes)
        terms, bias = self.projections.terms(x, group, _concat(ws)), self._bias(group, modules, sizes)
        if slot is not None and slot.dora:  # DoRA: g * (x W^T + delta) + bias, g = 1 for plain LoRA
            y = sum_terms(g, terms + [self.delta(x, group)], g.scope)
            with g.scoped(f"lora/{group}"):
                y = g.op("Mul", [y, slot.m_name])
            y = sum_terms(g, [y] + bias, g.scope)
        else:
            y = self.with_lora(x, group, terms, bias)
        return [y] if len(ws) == 1 else g.op("Split", [y, g.const(sizes)], n_out=len(ws), axis=-1)

    def with_lora(self, x: str, group: str, terms: list[Term], bias: list[str] = ()) -> str:
        """The sum of ``terms`` (the base projection's), ``bias`` (vectors) and the group's LoRA delta: one node of
        the native kernel adds its delta onto the terms (then the bias, if any, in one Add); otherwise one
        Add/Sum node for all of them."""
        g, slot = self.g, self.slots.get(group)
        if slot is not None and self.branches[slot].folds(x, terms):
            return sum_terms(g, [self.branches[slot].delta(x, slot, terms), *bias], g.scope)
        delta = self.delta(x, group)
        terms = [*terms, *bias]
        # with a single base term the Add is there only for the delta: named in the branch's scope, profiles count it as LoRA
        return sum_terms(g, terms + ([delta] if delta is not None else []), f"lora/{group}" if len(terms) == 1 else g.scope)

    def delta(self, x: str, group: str) -> str | None:
        """The group's LoRA delta on its own (None: no slot)."""
        slot = self.slots.get(group)
        return None if slot is None else self.branches[slot].delta(x, slot)

    def _apart(self, x: str, group: str, modules: tuple[str, ...], ws: list, sizes: list[int]) -> list[str]:
        """Modules stored differently (e.g. an int8 module in an int4 recipe): one projection each, the group's
        one delta split among them."""
        g, slot = self.g, self.slots.get(group)
        delta = self.delta(x, group)
        ys = [sum_terms(g, self.projections.terms(x, m, w), g.scope) for m, w in zip(modules, ws)]
        if delta is not None:
            with g.scoped(f"lora/{group}"):
                parts = g.op("Split", [delta, g.const(sizes)], n_out=len(ws), axis=-1)
                ys = [g.op("Add", [y, d]) for y, d in zip(ys, parts)]
                if slot.dora:
                    scales = g.op("Split", [slot.m_name, g.const(sizes)], n_out=len(ws), axis=0)
                    ys = [g.op("Mul", [y, m]) for y, m in zip(ys, scales)]
        trained = (g.op("Split", [slot.bias_name, g.const(sizes)], n_out=len(ws), axis=0) if slot is not None and slot.bias
                   else [None] * len(ws))  # fmt: skip
        return [sum_terms(g, [y] + self._bias(m, (m,), [n]) + ([t] if t else []), g.scope)
                for y, m, n, t in zip(ys, modules, sizes, trained)]  # fmt: skip

    def _bias(self, name: str, modules: tuple[str, ...], sizes: list[int]) -> list[str]:
        """The modules' biases as one constant (zeros for a module without one) and the adapter's change of it."""
        bs = [self.weights.get(f"{m}.bias") for m in modules]
        slot = self.slots.get(name)
        if slot is not None and slot.replace and bs[0] is not None:
            return [slot.replaced_bias_name]
        trained = [slot.bias_name] if slot is not None and slot.bias else []
        if all(b is None for b in bs):
            return trained
        cat = np.concatenate([np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32) for b, n in zip(bs, sizes)])
        return [self.g.weight(f"{name}.bias", cat.astype(self.ct))] + trained


def _concatenable(ws: list) -> bool:
    """Weights that can become one matmul: all float, or all quantized the same way."""
    if all(isinstance(w, np.ndarray) for w in ws):
        return len({w.dtype for w in ws}) == 1
    if not all(isinstance(w, QTensor) for w in ws):
        return False
    kinds = {(w.bits, w.block, w.k, w.zero_points is None, w.offsets is None, w.scales.dtype) for w in ws}
    return len(kinds) == 1


def _concat(ws: list):
    """Stack weights along the output dimension (N); quantized blocks are per row, so this is exact."""
    if len(ws) == 1:
        return ws[0]
    if isinstance(ws[0], np.ndarray):
        return np.concatenate(ws, axis=0)

    def cat(xs: list) -> np.ndarray | None:
        return None if xs[0] is None else np.concatenate(xs, axis=0)

    return QTensor(codes=cat([w.codes for w in ws]), scales=cat([w.scales for w in ws]),
                   zero_points=cat([w.zero_points for w in ws]), bits=ws[0].bits, block=ws[0].block, k=ws[0].k,
                   offsets=cat([w.offsets for w in ws]))  # fmt: skip
