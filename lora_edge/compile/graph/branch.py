"""Branch emitters: a slot's LoRA delta (x @ A) @ B, and the overridable inputs A and B it reads.

- :class:`OnnxBranch`: standard MatMuls, A and B in the compute dtype (any ONNX Runtime);
- :class:`NativeBranch`: one ``lora_edge.LoraDelta`` node, float16 A and B;
- :class:`NativeQ8Branch`: one ``LoraDeltaQ8`` node, int8 A and B with their float32 scales;
- :class:`W8A8Branch`: one ``LoraDeltaQ8`` node reading its part of the adapter's one w8a8 blob.

A native node also takes the terms of its layer (terms.py) and returns their sum plus the delta, so that the
layer reads its output once. Nodes are named ``lora/<slot>/...`` (``lora+base/<slot>/...`` for a node that also
computes its int4 projection) so that profiles can tell the branch from the base.
:class:`Branches` picks one per slot from the options.
"""

from __future__ import annotations

import numpy as np

from ...native.contract import DOMAIN, W8A8_BLOB, Feature, Op
from ...package.manifest import ALORA_MASK, EMBEDDING, ROW_MASK, ROW_MASK_CHUNKS
from ..models.spec import Slot
from .blob import blob_slots
from .builder import GraphBuilder
from .options import GraphOptions
from .terms import OffsetTerm, PackedTerm, Term, is_folded

Inputs = dict[str, tuple[np.ndarray, list]]  # graph input -> (default, symbolic shape)


def ab_inputs(slot: Slot, null_rank: int, dtype) -> Inputs:
    """lora_A and lora_B at rank ``null_rank``: zeros, which compute the base."""
    if slot.chunk_width:  # B (chunks, r_m, c); A's rank is n_modules * r_m
        c, n = slot.chunk_width, len(slot.chunk_modules)
        a_rank, b_shape, b_dims = null_rank * len(slot.parts), (n, null_rank, c), [n, slot.module_rank_dim, c]
    else:  # B (r, out)
        a_rank, b_shape, b_dims = null_rank, (null_rank, slot.out_features), [slot.rank_dim, slot.out_features]
    a = np.zeros((slot.in_features, a_rank), dtype)
    return {slot.a_name: (a, [slot.in_features, slot.rank_dim]), slot.b_name: (np.zeros(b_shape, dtype), b_dims)}


class OnnxBranch:
    """Two MatMuls; a chunked B (spec.Slot) is one batched MatMul of each chunk by its module's slice of x @ A. With
    ``alora`` the delta is multiplied by the activation mask, so an activated adapter leaves the positions before its
    invocation tokens (and their KV cache) exactly the base's. With ``row_mask`` x @ A is multiplied by a per-row mask
    over the rank, so that a call whose A and B stack several adapters along the rank gives each row its own adapter's
    delta: the other adapters' columns are multiplied by zero, which adds exact zeros to the row's sum."""

    def __init__(self, g: GraphBuilder, dtype, alora: bool = False, row_mask: bool = False) -> None:
        self.g, self.dtype, self.alora, self.row_mask = g, dtype, alora, row_mask

    def inputs(self, slot: Slot, null_rank: int) -> Inputs:
        return ab_inputs(slot, null_rank, self.dtype)

    def folds(self, x: str, terms: list[Term]) -> bool:
        return False  # the layer adds its terms and the delta in one Add/Sum

    def delta(self, x: str, slot: Slot, terms: list[Term] = ()) -> str:
        assert not terms, "the layer sums the terms of an ONNX branch"
        g = self.g
        with g.scoped(f"lora/{slot.name}"):
            xa = g.op("MatMul", [x, slot.a_name])  # (B, S, r)
            if not slot.chunk_width:
                return self._masked(g.op("MatMul", [self.rows(xa), slot.b_name]))  # (B, S, out)
            chunks = list(slot.chunk_modules)
            xa = g.op("Reshape", [xa, g.const([0, 0, len(slot.parts), 1, -1])])  # (B, S, n_modules, 1, r_m)
            if self.row_mask:  # every module's block of ranks stacks the same adapters
                xa = g.op("Mul", [xa, ROW_MASK_CHUNKS])  # (B, 1, 1, 1, r_m) mask
            if chunks != list(range(len(slot.parts))):  # a module with several chunks reads its x @ A once per chunk
                xa = g.op("Gather", [xa, g.const(chunks)], axis=2)  # (B, S, chunks, 1, r_m)
            y = g.op("MatMul", [xa, slot.b_name])  # (B, S, chunks, 1, c)
            return self._masked(g.op("Reshape", [y, g.const([0, 0, slot.out_features])]))  # (B, S, out)

    def rows(self, xa: str) -> str:
        """x @ A (B, S, r) with each row's own adapter's columns kept (the mask is (B, 1, r); (1, 1, 1) ones by default)."""
        return self.g.op("Mul", [xa, ROW_MASK]) if self.row_mask else xa

    def _masked(self, delta: str) -> str:
        # the mask is (B, S, 1) as it is: an Unsqueeze of it would be folded away by ONNX Runtime as if it were constant
        return self.g.op("Mul", [delta, ALORA_MASK]) if self.alora else delta


class _KernelBranch:
    """One node of the native kernel, which adds the delta onto up to two terms shaped like the output, and
    computes one folded term of the same x (a projection's float-offset correction, or its int4 product)."""

    def __init__(self, g: GraphBuilder) -> None:
        self.g = g

    def folds(self, x: str, terms: list[Term]) -> bool:
        plain = [t for t in terms if not is_folded(t)]
        folded = [t for t in terms if is_folded(t)]
        return len(plain) <= 2 and len(folded) <= 1 and all(t.x == x for t in folded)

    def delta(self, x: str, slot: Slot, terms: list[Term] = ()) -> str:
        """The delta plus ``terms`` (see :meth:`folds`), one node."""
        g = self.g
        attrs = {"chunk_modules": list(slot.chunk_modules)} if slot.chunk_width else {}
        offset = next((t for t in terms if isinstance(t, OffsetTerm)), None)
        packed = next((t for t in terms if isinstance(t, PackedTerm)), None)
        addends = [t for t in terms if t is not offset and t is not packed]  # contract.BRANCH_ADDENDS' order
        if offset is not None:  # (base, extra, offsets)
            g.need(Feature.BLOCK_OFFSET)
            assert offset.x == x and len(addends) <= 2
            addends = [*addends, *[""] * (2 - len(addends)), offset.offsets]
            attrs["offset_block"] = offset.block
        if packed is not None:  # (base, extra, offsets, packed): the node computes the projection too
            g.need(Feature.MATMUL_Q4)
            assert packed.x == x and offset is None and len(addends) <= 2
            addends = [*addends, *[""] * (3 - len(addends)), packed.packed]
        with g.scoped(f"lora+base/{slot.name}" if packed is not None else f"lora/{slot.name}"):
            return self.node(x, slot, addends, attrs)

    def node(self, x: str, slot: Slot, addends: list[str], attrs: dict) -> str:
        raise NotImplementedError


class NativeBranch(_KernelBranch):
    def inputs(self, slot: Slot, null_rank: int) -> Inputs:
        return ab_inputs(slot, null_rank, np.float16)  # read as they are: half the bytes of float32

    def node(self, x: str, slot: Slot, addends: list[str], attrs: dict) -> str:
        self.g.need(Feature.LORA_DELTA)
        return self.g.op(Op.LORA_DELTA, [x, slot.a_name, slot.b_name, *addends], domain=DOMAIN, **attrs)


class NativeQ8Branch(_KernelBranch):
    def inputs(self, slot: Slot, null_rank: int) -> Inputs:
        out = ab_inputs(slot, null_rank, np.int8)
        (a, _), (b, b_shape) = out[slot.a_name], out[slot.b_name]
        sa, sb = slot.scale_names  # one scale per column of A, per row of B
        out[sa] = (np.zeros(a.shape[1], np.float32), [slot.rank_dim])
        out[sb] = (np.zeros(b.shape[:-1], np.float32), b_shape[:-1])
        return out

    def node(self, x: str, slot: Slot, addends: list[str], attrs: dict) -> str:
        sa, sb = slot.scale_names
        self.g.need(Feature.LORA_DELTA_Q8)
        return self.g.op(Op.LORA_DELTA_Q8, [x, slot.a_name, sa, slot.b_name, sb, *addends], domain=DOMAIN, **attrs)


class W8A8Branch(_KernelBranch):
    """No inputs of its own: A, B and their scales are the slot's part of the blob (adapter_inputs.py adds it)."""

    def __init__(self, g: GraphBuilder, index: dict[str, int]) -> None:
        super().__init__(g)
        self.index = index  # slot -> its part of the blob

    def inputs(self, slot: Slot, null_rank: int) -> Inputs:
        return {}

    def node(self, x: str, slot: Slot, addends: list[str], attrs: dict) -> str:
        self.g.need(Feature.LORA_DELTA_Q8, Feature.W8A8)
        return self.g.op(Op.LORA_DELTA_Q8, [x, W8A8_BLOB, "", "", "", *addends], domain=DOMAIN, slot=self.index[slot.name],
                         **attrs)  # fmt: skip


class Branches:
    def __init__(self, g: GraphBuilder, options: GraphOptions, slots: dict[str, Slot]) -> None:
        # the embedding's LoRA is gathered by the graph (embedding.py): standard ops, the compute dtype
        self.onnx = OnnxBranch(g, options.ct, options.alora, options.row_mask)
        self.blob = blob_slots(slots, options.lora_kernel, options.lora_dtype)
        self.w8a8 = W8A8Branch(g, {s.name: i for i, s in enumerate(self.blob)}) if self.blob else None
        if not options.native:
            self.kind = self.onnx
        elif options.lora_dtype.is_int8:  # w8a8: for the slots the blob does not take
            self.kind = NativeQ8Branch(g)
        else:
            self.kind = NativeBranch(g)

    def __getitem__(self, slot: Slot) -> OnnxBranch | _KernelBranch:
        if slot.name == EMBEDDING:
            return self.onnx
        if self.w8a8 is not None and slot.name in self.w8a8.index:
            return self.w8a8
        return self.kind
