"""The linear algebra every decoder graph shares, as closures over one graph being built: float and
quantized (MatMulNBits + float-offset correction) projections, LoRA branches with their DoRA scales
and trained-bias inputs, biases, grouped projections (q/k/v, gate/up) and norms.

``linear_ops(...)`` returns them as attributes; a family's ``build_graph`` calls them in its order.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from ...package.manifest import EMBEDDING
from .builder import GraphBuilder
from ...native.contract import DOMAIN, Q8X_WIDTH, W8A8_BLOB, Feature, Op
from ...native.encode import w8a8_blob
from ..quant.blocks import QTensor, pack_q4, packs_q4
from ..models.spec import DecoderSpec, Slot


class OffsetTerm(NamedTuple):
    """The float-offset correction blocksum(x) @ offsets of a quantized projection, not yet a node: on the
    native kernel it joins the node that sums it (a LoraDelta's `offsets` input, else a BlockOffset)."""

    x: str
    offsets: str  # (n_blocks, N) float16
    block: int


class PackedTerm(NamedTuple):
    """An int4 projection x @ W_hat.T on the native kernel (offsets included), not yet a node: it joins the
    branch's node that sums it (a LoraDelta's `packed` input, one node for both), else it is a MatMulQ4."""

    x: str
    packed: str  # (ceil(N / 16), n_blocks, 320) uint8, lora_edge.quant.pack_q4
    k: int
    n: int


def blob_slots(slots: dict[str, Slot], lora_kernel: str, lora_dtype: str) -> list[Slot]:
    """The slots whose A, B and scales a package keeps in its w8a8 blob (kernel v5), in the blob's order: with
    ``--lora-dtype w8a8``, every slot but the embedding's whose B chunks (or outputs) are a whole number of
    16-column vectors (the others keep int8's own inputs)."""
    if lora_kernel != "native" or lora_dtype != "w8a8":
        return []
    return [s for s in slots.values() if s.name != EMBEDDING and (s.chunk_width or s.out_features) % Q8X_WIDTH == 0]


def blob_geometry(slot: Slot) -> tuple[int, int]:
    """(chunks, c) of a slot's B in a w8a8 blob: its chunks and their width, or one chunk of all its outputs."""
    return (len(slot.chunk_modules), slot.chunk_width) if slot.chunk_width else (1, slot.out_features)


def linear_ops(g: GraphBuilder, spec: DecoderSpec, weights: dict, slots: dict[str, Slot], ct, store_fp16: bool,
               accuracy_level: int, fused: bool, lora_kernel: str = "onnx",
               lora_dtype: str = "float16") -> SimpleNamespace:  # fmt: skip
    """``ct``: the compute dtype (np.float32 or np.float16). ``lora_kernel`` "native": each branch is one
    ``lora_edge.LoraDelta`` node (lora_edge/native) taking float16 A and B, or with ``lora_dtype`` "int8"
    one ``LoraDeltaQ8`` node taking int8 A and B and their float32 scales; "onnx": standard MatMuls."""
    f32 = np.float32
    CT = 10 if ct is np.float16 else 1  # the compute dtype's ONNX type, for Cast
    native = lora_kernel == "native"
    if native and ct is not np.float32:
        raise ValueError("the native LoRA kernel computes in float32; it is for the cpu target")
    int8 = native and lora_dtype in ("int8", "w8a8")

    def lt(slot: Slot):  # the dtype of a slot's lora_A / lora_B (embedding LoRA is gathered by the graph, in ct)
        return (np.int8 if int8 else np.float16) if native and slot.name != EMBEDDING else ct

    blob_index = {s.name: i for i, s in enumerate(blob_slots(slots, lora_kernel, lora_dtype))}  # slot -> its blob part

    # -- weights ---------------------------------------------------------------------------
    def adapter_inputs(null_rank: int) -> dict[str, tuple[np.ndarray, list]]:
        """Every slot's overridable inputs: name -> (default, symbolic shape). The defaults compute the base."""
        out: dict[str, tuple[np.ndarray, list]] = {}
        for slot in slots.values():
            if slot.name in blob_index:
                pass  # no inputs of its own: its A, B and scales are its part of the one w8a8 blob (below)
            elif slot.chunk_width:  # (chunks, r_m, c): A's rank is n_modules * r_m
                c, n = slot.chunk_width, len(slot.chunk_modules)
                out[slot.a_name] = (np.zeros((slot.in_features, null_rank * len(slot.parts)), lt(slot)), [slot.in_features, slot.rank_dim])
                out[slot.b_name] = (np.zeros((n, null_rank, c), lt(slot)), [n, slot.module_rank_dim, c])
            else:
                out[slot.a_name] = (np.zeros((slot.in_features, null_rank), lt(slot)), [slot.in_features, slot.rank_dim])
                out[slot.b_name] = (np.zeros((null_rank, slot.out_features), lt(slot)), [slot.rank_dim, slot.out_features])
            if lt(slot) is np.int8 and slot.name not in blob_index:  # one scale per column of A, per row of B
                sa, sb = slot.scale_names
                out[sa] = (np.zeros(out[slot.a_name][0].shape[1], f32), [slot.rank_dim])
                out[sb] = (np.zeros(out[slot.b_name][0].shape[:-1], f32), out[slot.b_name][1][:-1])
            if slot.dora:
                out[slot.m_name] = (np.ones(slot.out_features, ct), [slot.out_features])
            if slot.bias:
                out[slot.bias_name] = (np.zeros(slot.out_features, ct), [slot.out_features])
            if slot.replace:
                w = weights[f"{slot.name}.weight"]
                out[slot.weight_name] = (np.ascontiguousarray(w.T).astype(ct), [slot.in_features, slot.out_features])
                if f"{slot.name}.bias" in weights:
                    out[slot.replaced_bias_name] = (np.asarray(weights[f"{slot.name}.bias"]).astype(ct), [slot.out_features])
        if blob_index:  # w8a8: every q8x branch's part, all empty (R = 0) by default
            out[W8A8_BLOB] = (w8a8_blob([(blob_geometry(s), None) for s in blob_slots(slots, lora_kernel, lora_dtype)]), ["w8a8_bytes"])
        return out

    def float_weight(name: str, arr: np.ndarray) -> str:
        """A float initializer; stored as float16 (and cast up once at load) when the recipe says so."""
        if not store_fp16 or ct is np.float16:
            return g.weight(name, arr.astype(ct))
        return g.op("Cast", [g.weight(f"{name}.fp16", arr.astype(np.float16))], to=1)

    quant_values: dict[str, dict[str, str]] = {}

    def quant_inputs(name: str, qt: QTensor) -> dict[str, str]:
        """Initializers of a quantized weight, created once (a tied head reuses the embedding's)."""
        if name not in quant_values and q4_kernel(name, qt):  # one record per 16 columns and block: codes, scales, offsets
            quant_values[name] = {"packed": g.weight(f"{name}.q4x", pack_q4(qt))}
        if name not in quant_values:
            v = {"codes": g.weight(f"{name}.q{qt.bits}", qt.codes)}
            scales = g.weight(f"{name}.scales", qt.scales)
            v["scales"] = scales if qt.scales.dtype == ct else g.op("Cast", [scales], to=CT)  # fp16 on disk
            if qt.zero_points is not None:
                v["zero_points"] = g.weight(f"{name}.zero_points", qt.zero_points)
            if qt.offsets is not None and name == "model.embed_tokens.weight":  # rows gathered, (N, nb)
                v["offsets"] = g.op("Cast", [g.weight(f"{name}.offsets", qt.offsets)], to=CT)
            elif qt.offsets is not None:  # (nb, N): the right operand of a MatMul ORT can prepack (native: read as float16)
                v["offsets.T"] = g.weight(f"{name}.offsets.T", np.ascontiguousarray(qt.offsets.T))
                if not native:
                    v["offsets.T"] = g.op("Cast", [v["offsets.T"]], to=CT)
            quant_values[name] = v
        return quant_values[name]

    def q4_kernel(name: str, qt: QTensor) -> bool:
        """Whether the native kernel's MatMulQ4 runs this projection: int4 blocks of 32 with float offsets at
        accuracy level 4 (it computes as MatMulNBits does there, on int8 activations), and not a gathered
        embedding table, whose rows the graph dequantizes."""
        return native and accuracy_level == 4 and packs_q4(qt) and name != "model.embed_tokens.weight"

    block_sums: dict[tuple[str, int], str] = {}

    def matmul_nbits(x: str, name: str, qt: QTensor) -> str:
        """y = x @ W_hat.T through ONNX Runtime's MatMulNBits (weight-only, block-wise), plus the
        float-offset correction blocksum(x) @ offsets.T when the blocks have float offsets."""
        return summed(matmul_nbits_terms(x, name, qt), g.scope)

    def matmul_nbits_terms(x: str, name: str, qt: QTensor) -> list:
        """The summands of :func:`matmul_nbits`: the integer-kernel product, and the float-offset
        correction when there is one (callers add them in one node with any LoRA delta; on the native
        kernel the correction is an :class:`OffsetTerm` that :func:`summed` or the LoraDelta node runs)."""
        v = quant_inputs(name, qt)
        if "packed" in v:  # the kernel's own int4 product, offsets included (kernel v4)
            return [PackedTerm(x, v["packed"], qt.k, qt.n)]
        ins = [x, v["codes"], v["scales"]] + ([v["zero_points"]] if "zero_points" in v else [])
        y = g.op("MatMulNBits", ins, domain="com.microsoft", K=qt.k, N=qt.n, bits=qt.bits, block_size=qt.block,
                 accuracy_level=accuracy_level)  # fmt: skip
        if "offsets" not in v and "offsets.T" not in v:
            return [y]
        if native and "offsets.T" in v:
            return [y, OffsetTerm(x, v["offsets.T"], qt.block)]
        key = (x, qt.block)
        if key not in block_sums:  # shared by every projection that reads the same x
            xp = x
            if qt.n_blocks * qt.block != qt.k:
                xp = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, qt.n_blocks * qt.block - qt.k])])
            blocks = g.op("Reshape", [xp, g.const([0, 0, qt.n_blocks, qt.block])])  # (B, S, nb, block)
            block_sums[key] = g.op("ReduceSum", [blocks, g.const([-1])], keepdims=0)  # (B, S, nb)
        if "offsets.T" in v:
            return [y, g.op("MatMul", [block_sums[key], v["offsets.T"]])]  # (B, S, N)
        flat = g.op("Reshape", [block_sums[key], g.const([-1, qt.n_blocks])])  # tied head: (B*S, nb) x (V, nb)^T
        return [y, g.op("Reshape", [g.op("Gemm", [flat, v["offsets"]], transB=1), g.op("Shape", [y])])]

    def project_terms(x: str, name: str, w) -> list[str]:
        slot = slots.get(name)
        if slot is not None and slot.replace:  # the weight is an input (adapters may replace the module)
            return [g.op("MatMul", [x, slot.weight_name])]
        if isinstance(w, QTensor):
            return matmul_nbits_terms(x, f"{name}.weight", w)
        return [g.op("MatMul", [x, float_weight(f"{name}.weight.T", w.T)])]  # (in, out)

    def project(x: str, name: str, w) -> str:
        return summed(project_terms(x, name, w), g.scope)

    def summed(terms: list, scope: str) -> str:
        """One node for the sum: Add for two terms, Sum for more (one pass over the output, not two).
        An :class:`OffsetTerm` is added onto the first other term by one BlockOffset node; a
        :class:`PackedTerm` is a MatMulQ4 node."""
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

    def lora(x: str, group: str, addends: list = ()) -> str | None:
        """(x @ A) @ B for the group's slot; A, B are overridable float32 inputs (None: no slot).
        Its nodes are named ``lora/...`` so that profiles can tell the branch from the base.
        ``addends`` (native only, at most 2 shaped like the output, and at most one :class:`OffsetTerm`
        or :class:`PackedTerm` of the same x): the node returns their sum plus the delta."""
        slot = slots.get(group)
        if slot is None:
            return None
        # a node that also computes its int4 projection is named lora+base/...: profiles cannot split its time
        fused = native and any(isinstance(t, PackedTerm) for t in addends)
        with g.scoped(f"lora+base/{group}" if fused else f"lora/{group}"):
            if native:  # one node: float16 A and B read as they are, the B product split over the threads
                attrs = {"chunk_modules": list(slot.chunk_modules)} if slot.chunk_width else {}
                offset = next((t for t in addends if isinstance(t, OffsetTerm)), None)
                packed = next((t for t in addends if isinstance(t, PackedTerm)), None)
                addends = [t for t in addends if t is not offset and t is not packed]
                if offset is not None:  # (base, extra, offsets)
                    g.need(Feature.BLOCK_OFFSET)
                    assert offset.x == x and len(addends) <= 2
                    addends = [*addends, *[""] * (2 - len(addends)), offset.offsets]
                    attrs["offset_block"] = offset.block
                if packed is not None:  # (base, extra, offsets, packed): the node computes the projection too
                    g.need(Feature.MATMUL_Q4)
                    assert packed.x == x and offset is None and len(addends) <= 2
                    addends = [*addends, *[""] * (3 - len(addends)), packed.packed]
                if slot.name in blob_index:  # its A, B and scales: its part of the adapter's one blob
                    g.need(Feature.LORA_DELTA_Q8, Feature.W8A8)
                    return g.op(Op.LORA_DELTA_Q8, [x, W8A8_BLOB, "", "", "", *addends], domain=DOMAIN,
                                slot=blob_index[slot.name], **attrs)  # fmt: skip
                if lt(slot) is np.int8:
                    sa, sb = slot.scale_names
                    g.need(Feature.LORA_DELTA_Q8)
                    return g.op(Op.LORA_DELTA_Q8, [x, slot.a_name, sa, slot.b_name, sb, *addends], domain=DOMAIN, **attrs)
                g.need(Feature.LORA_DELTA)
                return g.op(Op.LORA_DELTA, [x, slot.a_name, slot.b_name, *addends], domain=DOMAIN, **attrs)
            xa = g.op("MatMul", [x, slot.a_name])  # (B, S, r)
            if not slot.chunk_width:
                return g.op("MatMul", [xa, slot.b_name])  # (B, S, out)
            chunks = list(slot.chunk_modules)
            xa = g.op("Reshape", [xa, g.const([0, 0, len(slot.parts), 1, -1])])  # (B, S, n_modules, 1, r_m)
            if chunks != list(range(len(slot.parts))):  # a module with several chunks reads its x@A once per chunk
                xa = g.op("Gather", [xa, g.const(chunks)], axis=2)  # (B, S, chunks, 1, r_m)
            y = g.op("MatMul", [xa, slot.b_name])  # (B, S, chunks, 1, c): one small product per chunk
            return g.op("Reshape", [y, g.const([0, 0, slot.out_features])])  # (B, S, out)

    def with_lora(x: str, group: str, terms: list, bias: list[str] = ()) -> str:
        """The sum of ``terms`` (full-shape outputs of the base projection), ``bias`` (broadcast vectors)
        and the group's LoRA delta: on the native kernel one node adds its delta onto the terms (then
        the bias, if any, in one Add); otherwise one Add/Sum node for all of them."""
        plain = [t for t in terms if not isinstance(t, (OffsetTerm, PackedTerm))]
        folded = [t for t in terms if isinstance(t, (OffsetTerm, PackedTerm))]
        if native and group in slots and len(plain) <= 2 and len(folded) <= 1 and all(t.x == x for t in folded):
            return summed([lora(x, group, terms), *bias], g.scope)
        delta = lora(x, group)
        terms = [*terms, *bias]
        return summed(terms + ([delta] if delta is not None else []), f"lora/{group}" if len(terms) == 1 else g.scope)

    def bias_terms(name: str, modules: tuple[str, ...], sizes: list[int]) -> list[str]:
        """The modules' biases as one constant (zeros for a module without one), or nothing."""
        bs = [weights.get(f"{m}.bias") for m in modules]
        slot = slots.get(name)
        if slot is not None and slot.replace and bs[0] is not None:
            return [slot.replaced_bias_name]
        trained = [slot.bias_name] if slot is not None and slot.bias else []  # the adapter's change of the bias
        if all(b is None for b in bs):
            return trained
        cat = np.concatenate([np.zeros(n, f32) if b is None else np.asarray(b, f32) for b, n in zip(bs, sizes)])
        return [g.weight(f"{name}.bias", cat.astype(ct))] + trained

    def group_linear(x: str, group: str, modules: tuple[str, ...]) -> list[str]:
        """The outputs of ``modules`` (which all read ``x``), fused into one matmul when their formats agree."""
        ws = [weights[f"{m}.weight"] for m in modules]
        sizes = [w.n if isinstance(w, QTensor) else w.shape[0] for w in ws]
        if len(ws) == 1 or _concatenable(ws):
            terms, bias = project_terms(x, group, _concat(ws)), bias_terms(group, modules, sizes)
            slot = slots.get(group)
            if slot is not None and slot.dora:  # DoRA: g * (x W^T + delta) + bias, g = 1 for plain LoRA
                y = summed(terms + [lora(x, group)], g.scope)
                with g.scoped(f"lora/{group}"):
                    y = g.op("Mul", [y, slot.m_name])
                y = summed([y] + bias, g.scope)
            else:  # the LoRA delta joins the base's own sum (one Sum node) when there is one, else its own Add
                y = with_lora(x, group, terms, bias)
            return [y] if len(ws) == 1 else g.op("Split", [y, g.const(sizes)], n_out=len(ws), axis=-1)
        delta = lora(x, group)
        ys = [project(x, m, w) for m, w in zip(modules, ws)]
        if delta is not None:
            with g.scoped(f"lora/{group}"):
                parts = g.op("Split", [delta, g.const(sizes)], n_out=len(ws), axis=-1)
                ys = [g.op("Add", [y, d]) for y, d in zip(ys, parts)]
                if slots[group].dora:
                    scales = g.op("Split", [slots[group].m_name, g.const(sizes)], n_out=len(ws), axis=0)
                    ys = [g.op("Mul", [y, m]) for y, m in zip(ys, scales)]
        slot = slots.get(group)
        trained = (g.op("Split", [slot.bias_name, g.const(sizes)], n_out=len(ws), axis=0) if slot is not None and slot.bias
                   else [None] * len(ws))  # fmt: skip
        return [summed([y] + bias_terms(m, (m,), [n]) + ([t] if t else []), g.scope) for y, m, n, t in zip(ys, modules, sizes, trained)]

    def gather_dequant(table: str, qt: QTensor, ids: str) -> str:
        """Embedding rows from a quantized table: gather codes/scales/zero points of the ids, dequantize.

        Only the looked-up rows are dequantized, with standard ops, so a tied lm_head can share the
        very same MatMulNBits initializers (one quantized copy of the table serves both)."""
        v = quant_inputs(table, qt)
        nb = qt.n_blocks
        codes = g.op("Gather", [v["codes"], ids], axis=0)  # (B, S, nb, blob) uint8

        def unpack(p: str, length: int) -> str:  # uint8 codes -> float (.., length)
            if qt.bits == 8:
                return g.op("Cast", [p], to=CT)
            high = g.op("BitShift", [p, g.const(4, np.uint8)], direction="RIGHT")
            low = g.op("Sub", [p, g.op("BitShift", [high, g.const(4, np.uint8)], direction="LEFT")])
            both = g.op("Concat", [g.op("Unsqueeze", [low, g.const([-1])]), g.op("Unsqueeze", [high, g.const([-1])])], axis=-1)
            flat = g.op("Reshape", [both, g.op("Concat", [g.op("Slice", [g.op("Shape", [p]), g.const([0]), g.const([-1])]), g.const([-1])], axis=0)])
            return g.op("Cast", [g.op("Slice", [flat, g.const([0]), g.const([length]), g.const([-1])])], to=CT)

        q = unpack(codes, qt.block)  # (B, S, nb, block)
        if "zero_points" not in v:
            zp = g.const(2.0 ** (qt.bits - 1), ct)
        else:
            zp = g.op("Unsqueeze", [unpack(g.op("Gather", [v["zero_points"], ids], axis=0), nb), g.const([-1])])  # (B, S, nb, 1)
        scale = g.op("Unsqueeze", [g.op("Gather", [v["scales"], ids], axis=0), g.const([-1])])  # (B, S, nb, 1)
        rows = g.op("Mul", [g.op("Sub", [q, zp]), scale])  # (B, S, nb, block)
        if "offsets" in v:
            rows = g.op("Add", [rows, g.op("Unsqueeze", [g.op("Gather", [v["offsets"], ids], axis=0), g.const([-1])])])
        rows = g.op("Reshape", [rows, g.const([0, 0, -1])])  # (B, S, nb*block)
        if nb * qt.block != qt.k:
            rows = g.op("Slice", [rows, g.const([0]), g.const([qt.k]), g.const([-1])])
        return rows

    # -- norms -----------------------------------------------------------------------------
    def norm_weight(name: str) -> str:
        return g.weight(name, (weights[name] + np.float32(spec.norm_offset)).astype(ct))

    def norm_bias(weight_name: str) -> str:  # a LayerNorm's beta, beside its weight
        name = weight_name.replace(".weight", ".bias")
        return g.weight(name, weights[name].astype(ct))

    def norm(x: str, weight_name: str) -> str:
        """The family's norm: RMSNorm, or LayerNorm with bias when ``spec.norm == "layer"``."""
        w = norm_weight(weight_name)
        if spec.norm == "layer":  # LayerNorm with bias (standard ONNX since opset 17)
            return g.op("LayerNormalization", [x, w, norm_bias(weight_name)], axis=-1, epsilon=spec.rms_norm_eps)
        if fused:
            return g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=spec.rms_norm_eps, stash_type=1)
        # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern ORT itself fuses into SimplifiedLayerNormalization.
        var = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0, f32)])], axes=[-1], keepdims=1)
        denom = g.op("Sqrt", [g.op("Add", [var, g.const(spec.rms_norm_eps, f32)])])
        return g.op("Mul", [g.op("Div", [x, denom]), w])

    def add_norm(residual: str, x: str, weight_name: str) -> tuple[str, str]:
        """(norm(residual + x), residual + x)."""
        if not fused:
            h = g.op("Add", [residual, x])
            return norm(h, weight_name), h
        w = norm_weight(weight_name)
        if spec.norm == "layer":
            y, _, _, h = g.op("SkipLayerNormalization", [x, residual, w, norm_bias(weight_name)], outs=[None, "", "", None], domain="com.microsoft",
                              epsilon=spec.rms_norm_eps)  # fmt: skip
            return y, h
        y, _, _, h = g.op("SkipSimplifiedLayerNormalization", [x, residual, w], outs=[None, "", "", None], domain="com.microsoft",
                          epsilon=spec.rms_norm_eps)  # fmt: skip
        return y, h

    return SimpleNamespace(**{name: fn for name, fn in locals().items() if callable(fn) and not isinstance(fn, type)})


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
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs, axis=0)  # noqa: E731
    return QTensor(codes=cat([w.codes for w in ws]), scales=cat([w.scales for w in ws]), zero_points=cat([w.zero_points for w in ws]),
                   bits=ws[0].bits, block=ws[0].block, k=ws[0].k, offsets=cat([w.offsets for w in ws]))  # fmt: skip
