"""The summands of a linear layer's output, and the one node that adds them.

A projection emitter returns its output as a list of terms rather than one value, so that the layer writes one
Add/Sum for the projection, its LoRA delta and its bias (one pass over the output, not one per addend). On the
native kernel two kinds of term are not nodes yet: they become inputs of the node that sums them (a branch's
LoraDelta, see branch.py), or, with no branch to join, nodes of their own (:func:`sum_terms`).
"""

from __future__ import annotations

from typing import NamedTuple

from ...native.contract import DOMAIN, Feature, Op
from .builder import GraphBuilder


class OffsetTerm(NamedTuple):
    """The float-offset correction blocksum(x) @ offsets of a quantized projection: a LoraDelta's `offsets`
    input, else a BlockOffset node adding it onto another term."""

    x: str
    offsets: str  # (n_blocks, N) float16
    block: int


class PackedTerm(NamedTuple):
    """An int4 projection x @ W_hat.T (offsets included) on the kernel's packed layout: a LoraDelta's `packed`
    input (one node computes projection and delta), else a MatMulQ4 node."""

    x: str
    packed: str  # (ceil(N / 16), n_blocks, 320) uint8, lora_edge.compile.quant.blocks.pack_q4
    k: int
    n: int


Term = str | OffsetTerm | PackedTerm


def is_folded(term: Term) -> bool:
    """Whether ``term`` is not a value yet but an input of the node that sums it."""
    return isinstance(term, (OffsetTerm, PackedTerm))


def sum_terms(g: GraphBuilder, terms: list[Term], scope: str) -> str:
    """One node for the sum, named in ``scope``: Add for two terms, Sum for more. A :class:`PackedTerm` becomes
    a MatMulQ4 node; an :class:`OffsetTerm` is added onto the first other term by one BlockOffset node."""
    if any(isinstance(t, PackedTerm) for t in terms):
        g.need(Feature.MATMUL_Q4)
    terms = [g.op(Op.MATMUL_Q4, [t.x, t.packed], domain=DOMAIN, K=t.k, N=t.n) if isinstance(t, PackedTerm) else t
             for t in terms]  # fmt: skip
    offset = next((t for t in terms if isinstance(t, OffsetTerm)), None)
    if offset is not None:
        rest = [t for t in terms if t is not offset]
        g.need(Feature.BLOCK_OFFSET)
        terms = [g.op(Op.BLOCK_OFFSET, [offset.x, offset.offsets, rest[0]], domain=DOMAIN, block=offset.block), *rest[1:]]
    if len(terms) == 1:
        return terms[0]
    with g.scoped(scope):
        return g.op("Add" if len(terms) == 2 else "Sum", terms)
