"""Llama-shaped decoders: LlamaForCausalLM (SmolLM2, TinyLlama, Llama 2/3), and the families that
differ from it only in details this module reads from the model or from the spec their family module
fills in (``mistral.py``, ``qwen2.py``, ``qwen3.py``, ``phi3.py``, ``gemma.py``): linear-layer biases
(Qwen2's q/k/v; Llama's attention_bias/mlp_bias), per-head q/k RMSNorm (Qwen3), an explicit head_dim,
sliding-window attention (exact within the window: the package's context is capped at the window),
fused q/k/v and gate/up modules in the model (Phi-3), (1 + w) norms, scaled embeddings, GELU-tanh,
soft-capping and sandwich norms (Gemma, Gemma 2).

Graph I/O follows the ONNX Runtime GenAI / Optimum decoder convention:
``input_ids, attention_mask, position_ids, past_key_values.{i}.key/value`` ->
``logits, present.{i}.key/value``, with the KV cache laid out (batch, kv_heads, seq, head_dim).

Each linear layer ``y = x @ W.T`` is a MatMul (or MatMulNBits) against the weight; a group of layers
targeted by an adapter (see :class:`~lora_edge.models.spec.Slot`) also gets ``y += (x @ A) @ B`` with
A, B overridable graph inputs (``<group>.lora_A``: (in, r), ``<group>.lora_B``: (r, out), or (chunks, r_m, c)
without block-diagonal zeros, see :class:`~lora_edge.models.spec.Slot`; the LoRA scaling already folded into B).
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedFeatureError
from ..graph.builder import GraphBuilder
from ..quant.blocks import QTensor
from ..graph.ops import linear_ops
from .spec import BaseModel, DecoderSpec, LinearModule, Slot

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class LlamaFamily:
    # q/k/v and gate/up are single modules in the HF model (Phi-3: qkv_proj, gate_up_proj); adapters
    # target those fused modules, and the graph splits their outputs
    hf_fused = False

    def __init__(self, name: str = "llama", architectures: tuple[str, ...] = ("LlamaForCausalLM",)) -> None:
        self.name = name
        self.architectures = architectures

    def replaceable(self, spec: DecoderSpec) -> frozenset[str]:
        """Modules an adapter may replace outright (modules_to_save): the output head. Its weight becomes
        an input (float32, vocab x hidden per adapter that replaces it: large; merging avoids that)."""
        return frozenset({"lm_head"})

    def internal_weights(self, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The PyTorch state dict under the names (and layouts) the graph builder uses."""
        return state_dict

    # -- reading the PyTorch model (compile side) ------------------------------------------
    def spec_from_hf(self, hf_model) -> tuple[DecoderSpec, np.ndarray]:
        cfg = hf_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = hf_model.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        from ...errors import ModelError

        if rope_type in ("dynamic", "longrope"):
            raise ModelError(f"rope_scaling type {rope_type!r} depends on the sequence length at run time; not supported yet")
        inv_freq = rotary.inv_freq.detach().float().cpu().numpy().astype(np.float32)
        if 2 * inv_freq.size != head_dim:
            raise ModelError(f"partial rotary embeddings ({2 * inv_freq.size} of {head_dim} head dimensions) are not supported yet")
        max_pos = int(cfg.max_position_embeddings)
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None) or []
        sliding = window is not None and (getattr(cfg, "use_sliding_window", True) is not False or "sliding_attention" in layer_types)
        if sliding and window < max_pos:
            # attention over at most `window` keys equals full attention while the sequence fits in it
            max_pos = int(window)
        spec = DecoderSpec(
            family=self.name,
            architecture=type(hf_model).__name__,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=float(cfg.rms_norm_eps),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            rope_attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
            qk_norm=hasattr(hf_model.model.layers[0].self_attn, "q_norm"),
        )
        return spec, inv_freq

    def linear_modules(self, spec: DecoderSpec) -> dict[str, LinearModule]:
        h, q, kv, ff = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}  # fmt: skip
        out: dict[str, LinearModule] = {}
        for i in range(spec.num_layers):
            for name in _ATTN + _MLP:
                path = f"model.layers.{i}.{'self_attn' if name in _ATTN else 'mlp'}.{name}"
                out[path] = LinearModule(path, *dims[name])
        out["lm_head"] = LinearModule("lm_head", h, spec.vocab_size)
        return out

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]:
        """Modules that exist in the model but are not linear layers (targeting them is refused)."""
        names = {"model", "model.embed_tokens", "model.norm", "model.rotary_emb", "model.layers"}
        for i in range(spec.num_layers):
            p = f"model.layers.{i}"
            names |= {p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm", f"{p}.post_attention_layernorm"}
            if spec.qk_norm:
                names |= {f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"}
        return frozenset(names)

    def groups(self, spec: DecoderSpec, fused: bool) -> list[tuple[str, tuple[str, ...]]]:
        """Linear layers that share an input and become one matmul (and one LoRA branch) when ``fused``."""
        out = []
        for i in range(spec.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            if fused:
                out += [(f"{a}.qkv_proj", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")), (f"{a}.o_proj", (f"{a}.o_proj",)),
                        (f"{m}.gate_up_proj", (f"{m}.gate_proj", f"{m}.up_proj")), (f"{m}.down_proj", (f"{m}.down_proj",))]  # fmt: skip
            else:
                out += [(p, (p,)) for p in (f"{a}.{n}" for n in _ATTN)] + [(p, (p,)) for p in (f"{m}.{n}" for n in _MLP)]
        return out + [("lm_head", ("lm_head",))]

    # -- writing the graph -------------------------------------------------------------------
    def build_graph(self, base: BaseModel, weights: dict, slots: dict[str, Slot], opset: int, null_rank: int,
                    store_fp16: bool = False, accuracy_level: int = 4, fused: bool = True, compute_dtype: str = "float32",
                    lora_kernel: str = "onnx", lora_dtype: str = "float16"):  # fmt: skip
        """Return the ModelProto; the LoRA inputs are overridable initializers (rank-``null_rank`` zeros).

        ``weights`` maps HF names to float arrays or :class:`QTensor` (quantized: MatMulNBits / gathered
        and dequantized rows for the embedding). LoRA branches compute in the compute dtype; with
        ``lora_kernel`` "native" each is one LoraDelta node with float16 A and B (``lora_dtype`` "int8":
        a LoraDeltaQ8 node, int8 A and B with their scales). ``fused`` writes
        ONNX Runtime's fused operators (GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayer-
        Normalization, one matmul per q/k/v and gate/up group); otherwise standard ONNX ops only.
        ``compute_dtype`` "float16" (fused graphs, for GPUs) computes, caches and takes LoRA tensors in
        float16; the logits are still returned as float32."""
        spec = base.spec
        if compute_dtype not in ("float32", "float16"):
            raise ValueError(f"compute_dtype must be float32 or float16, got {compute_dtype}")
        if compute_dtype == "float16" and not fused:
            raise UnsupportedFeatureError("float16 compute needs the fused graph (--attention fused)")
        g = GraphBuilder(f"lora-edge {spec.architecture}")
        B, S, P, T = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
        H, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        f32 = np.float32
        ct = np.dtype(compute_dtype).type  # activations, KV cache, LoRA tensors
        CT = 10 if ct is np.float16 else 1  # its ONNX type, for Cast

        input_ids = g.input("input_ids", np.int64, [B, S])
        attn_mask = g.input("attention_mask", np.int64, [B, T])
        position_ids = g.input("position_ids", np.int64, [B, S])
        past = []
        for i in range(spec.num_layers):
            k = g.input(f"past_key_values.{i}.key", ct, [B, KV, P, D])
            v = g.input(f"past_key_values.{i}.value", ct, [B, KV, P, D])
            past.append((k, v))

        ops = linear_ops(g, spec, weights, slots, ct, store_fp16, accuracy_level, fused, lora_kernel, lora_dtype)
        overridable = ops.adapter_inputs(null_rank)
        float_weight, matmul_nbits_terms, with_lora = ops.float_weight, ops.matmul_nbits_terms, ops.with_lora
        group_linear, gather_dequant, norm, add_norm = ops.group_linear, ops.gather_dequant, ops.norm, ops.add_norm

        # -- shared per-call values ------------------------------------------------------------
        rope = spec.positions == "rope"
        g.scope = "rotary"
        if rope and fused:  # one (max_pos, D/2) table of cos and sin for RotaryEmbedding
            positions = np.arange(spec.max_position_embeddings, dtype=np.float32)[:, None]
            angles = positions * base.rope_inv_freq.astype(np.float32)[None, :]  # (max_pos, D/2), as HF computes it
            cos_cache = g.weight("rotary.cos_cache", (np.cos(angles) * spec.rope_attention_scaling).astype(ct))
            sin_cache = g.weight("rotary.sin_cache", (np.sin(angles) * spec.rope_attention_scaling).astype(ct))
        elif rope:  # cos and sin of this call's positions, standard ops
            pos = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=1), g.const([-1])])  # (B, S, 1)
            freqs = g.op("Mul", [pos, g.weight("rotary.inv_freq", base.rope_inv_freq.astype(f32))])  # (B, S, D/2)
            emb = g.op("Concat", [freqs, freqs], axis=-1)  # (B, S, D)
            cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
            if spec.rope_attention_scaling != 1.0:
                scale = g.const(spec.rope_attention_scaling, f32)
                cos, sin = g.op("Mul", [cos, scale]), g.op("Mul", [sin, scale])
            cos = g.op("Unsqueeze", [cos, g.const([1])])  # (B, 1, S, D)
            sin = g.op("Unsqueeze", [sin, g.const([1])])
        g.scope = "mask"
        if fused:
            seqlens_k = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [attn_mask, g.const([1])], keepdims=0), g.const(1)])], to=6)  # (B,) int32
            total_len = g.op("Cast", [g.op("Gather", [g.op("Shape", [attn_mask]), g.const(1)], axis=0)], to=6)  # scalar int32
        else:
            seq_len = g.op("Gather", [g.op("Shape", [input_ids]), g.const(1)], axis=0)  # S
            total = g.op("Gather", [g.op("Shape", [attn_mask]), g.const(1)], axis=0)  # T
            past_len = g.op("Sub", [total, seq_len])  # P
            q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total, g.const(1)]), g.const([1])])  # (S, 1)
            k_pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)]), g.const([0])])  # (1, T)
            causal = g.op("Not", [g.op("Greater", [k_pos, q_pos])])  # (S, T): key j visible from query i if j <= P+i
            padding = g.op("Unsqueeze", [g.op("Cast", [attn_mask], to=9), g.const([1, 2])])  # (B, 1, 1, T)
            allowed = g.op("And", [causal, padding])  # (B, 1, S, T)
            attn_bias = g.op("Where", [allowed, g.const(0.0, f32), g.const(np.finfo(f32).min, f32)])

        def heads(x: str, n: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
            return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, D])])], perm=[0, 2, 1, 3])

        def rotate(x: str) -> str:  # x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)
            x1, x2 = g.op("Split", [x], n_out=2, axis=-1)
            rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
            return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

        def repeat_kv(x: str) -> str:  # (B, KV, T, D) -> (B, H, T, D)
            if H == KV:
                return x
            x5 = g.op("Unsqueeze", [x, g.const([2])])  # (B, KV, 1, T, D)
            shape = g.op("Shape", [x5])
            target = g.op("Concat", [g.op("Slice", [shape, g.const([0]), g.const([2])]), g.const([H // KV]),
                                     g.op("Slice", [shape, g.const([3]), g.const([5])])], axis=0)  # fmt: skip
            return g.op("Reshape", [g.op("Expand", [x5, target]), g.const([0, H, -1, D])])

        scale = spec.attn_scale if spec.attn_scale is not None else D**-0.5

        def softcap(x: str, cap: float) -> str:  # cap * tanh(x / cap)
            return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, g.const(cap, ct)])]), g.const(cap, ct)])

        def activation(gate: str) -> str:
            if spec.activation == "silu":
                return g.op("Mul", [gate, g.op("Sigmoid", [gate])])
            if fused:  # the tanh approximation of GELU (gelu_pytorch_tanh), one fused kernel
                return g.op("FastGelu", [gate], domain="com.microsoft")
            inner = g.op("Mul", [g.op("Add", [gate, g.op("Mul", [g.op("Mul", [g.op("Mul", [gate, gate]), gate]), g.const(0.044715, ct)])]),
                                 g.const(float(np.sqrt(2 / np.pi)), ct)])  # fmt: skip
            return g.op("Mul", [g.op("Mul", [gate, g.const(0.5, ct)]), g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, ct)])])

        def head_norm(x: str, n: int, weight_name: str) -> str:  # RMSNorm over head_dim of each of n heads
            return g.op("Reshape", [norm(g.op("Reshape", [x, g.const([0, 0, n, D])]), weight_name), g.const([0, 0, n * D])])

        def attention(i: int, q: str, k: str, v: str) -> str:
            """Causal attention over past + new keys; writes present.{i}.key/value. Returns (B, S, H*D)."""
            if spec.qk_norm:
                q = head_norm(q, H, f"model.layers.{i}.self_attn.q_norm.weight")
                k = head_norm(k, KV, f"model.layers.{i}.self_attn.k_norm.weight")
            if fused:
                if rope:
                    q = g.op("RotaryEmbedding", [q, position_ids, cos_cache, sin_cache], domain="com.microsoft", num_heads=H, interleaved=0)
                    k = g.op("RotaryEmbedding", [k, position_ids, cos_cache, sin_cache], domain="com.microsoft", num_heads=KV, interleaved=0)
                out, *_ = g.op("GroupQueryAttention", [q, k, v, past[i][0], past[i][1], seqlens_k, total_len], domain="com.microsoft",
                                 outs=[None, f"present.{i}.key", f"present.{i}.value"], num_heads=H, kv_num_heads=KV, scale=scale,
                                 **({"softcap": spec.attn_softcap} if spec.attn_softcap else {}))  # fmt: skip
                return out
            q, k, v = heads(q, H), heads(k, KV), heads(v, KV)  # (B, n, S, D)
            if rope:
                q, k = rotate(q), rotate(k)
            k_all = g.op("Concat", [past[i][0], k], axis=2, out=f"present.{i}.key")  # (B, KV, T, D)
            v_all = g.op("Concat", [past[i][1], v], axis=2, out=f"present.{i}.value")
            scores = g.op("MatMul", [q, g.op("Transpose", [repeat_kv(k_all)], perm=[0, 1, 3, 2])])  # (B, H, S, T)
            scores = g.op("Mul", [scores, g.const(scale, f32)])
            if spec.attn_softcap:
                scores = softcap(scores, spec.attn_softcap)
            scores = g.op("Add", [scores, attn_bias])
            ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), repeat_kv(v_all)])  # (B, H, S, D)
            return g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, H * D])])  # (B, S, H*D)

        # -- the decoder -----------------------------------------------------------------------
        g.scope = "embed"
        table = weights["model.embed_tokens.weight"]
        if isinstance(table, QTensor):
            residual = gather_dequant("model.embed_tokens.weight", table, input_ids)
        else:
            embed_value = float_weight("model.embed_tokens.weight", table)  # one copy serves Gather and a tied head
            residual = g.op("Gather", [embed_value, input_ids], axis=0)
        emb_slot = slots.get("model.embed_tokens")
        if emb_slot is not None:  # embedding LoRA: rows of A gathered by token id, then @ B
            with g.scoped("lora/model.embed_tokens"):
                delta = g.op("MatMul", [g.op("Gather", [emb_slot.a_name, input_ids], axis=0), emb_slot.b_name])
                residual = g.op("Add", [residual, delta])
        if spec.embed_scale != 1.0:  # Gemma: after the lookup (and its LoRA), as the model does
            residual = g.op("Mul", [residual, g.const(spec.embed_scale, ct)])
        if spec.positions == "learned":  # GPT-2: a table of position embeddings, gathered by position id
            pos_table = g.weight("model.embed_positions.weight", weights["model.embed_positions.weight"].astype(ct))
            residual = g.op("Add", [residual, g.op("Gather", [pos_table, position_ids], axis=0)])
        groups = self.groups(spec, fused)
        per_layer = (len(groups) - 1) // spec.num_layers
        x = norm(residual, "model.layers.0.input_layernorm.weight")
        for i in range(spec.num_layers):
            p = f"model.layers.{i}"
            g.scope = p
            layer = dict(groups[i * per_layer : (i + 1) * per_layer])
            if self.hf_fused:  # one module in the model: its LoRA is one branch, its output is split here
                (qkv,) = group_linear(x, f"{p}.self_attn.qkv_proj", (f"{p}.self_attn.qkv_proj",))
                q, k, v = g.op("Split", [qkv, g.const([H * D, KV * D, KV * D])], n_out=3, axis=-1)
            elif fused:
                q, k, v = group_linear(x, f"{p}.self_attn.qkv_proj", layer[f"{p}.self_attn.qkv_proj"])
            else:
                (q,), (k,), (v,) = (group_linear(x, f"{p}.self_attn.{n}", (f"{p}.self_attn.{n}",)) for n in ("q_proj", "k_proj", "v_proj"))
            ctx = attention(i, q, k, v)
            (o,) = group_linear(ctx, f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj",))
            if spec.sandwich_norms:  # Gemma 2: norm the attention output, then the MLP input
                o = norm(o, f"{p}.post_attention_layernorm.weight")
                x, residual = add_norm(residual, o, f"{p}.pre_feedforward_layernorm.weight")
            else:
                x, residual = add_norm(residual, o, f"{p}.post_attention_layernorm.weight")
            if not spec.mlp_gated:  # GPT-2: act(up(x))
                (up,) = group_linear(x, f"{p}.mlp.up_proj", (f"{p}.mlp.up_proj",))
                act = activation(up)
            else:
                if self.hf_fused:
                    (gate_up,) = group_linear(x, f"{p}.mlp.gate_up_proj", (f"{p}.mlp.gate_up_proj",))
                    gate, up = g.op("Split", [gate_up, g.const([spec.intermediate_size] * 2)], n_out=2, axis=-1)
                elif fused:
                    gate, up = group_linear(x, f"{p}.mlp.gate_up_proj", layer[f"{p}.mlp.gate_up_proj"])
                else:
                    (gate,), (up,) = (group_linear(x, f"{p}.mlp.{n}", (f"{p}.mlp.{n}",)) for n in ("gate_proj", "up_proj"))
                act = g.op("Mul", [activation(gate), up])  # act(gate) * up
            (down,) = group_linear(act, f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj",))
            if spec.sandwich_norms:
                down = norm(down, f"{p}.post_feedforward_layernorm.weight")
            nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < spec.num_layers else "model.norm.weight"
            x, residual = add_norm(residual, down, nxt)

        g.scope = "head"
        if "lm_head.weight" in weights:  # untied, or tied but merged with an lm_head delta
            (logits,) = group_linear(x, "lm_head", ("lm_head",))
        else:  # tied: read the embedding's own weights, never a transposed copy
            if isinstance(table, QTensor):
                terms = matmul_nbits_terms(x, "model.embed_tokens.weight", table)
            else:
                flat = g.op("Reshape", [x, g.const([-1, spec.hidden_size])])  # (B*S, h)
                logits2d = g.op("Gemm", [flat, embed_value], transB=1)  # (B*S, V)
                dims = g.op("Concat", [g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])]), g.const([spec.vocab_size])], axis=0)
                terms = [g.op("Reshape", [logits2d, dims])]  # (B, S, V)
            logits = with_lora(x, "lm_head", terms)

        if spec.final_softcap:
            logits = softcap(logits, spec.final_softcap)
        g.scope = ""
        if ct is not f32:
            logits = g.op("Cast", [logits], to=1)
        g.output(logits, "logits", f32, [B, S, spec.vocab_size])
        for i in range(spec.num_layers):
            g.outputs.append(_vi(f"present.{i}.key", [B, KV, T, D], CT))
            g.outputs.append(_vi(f"present.{i}.value", [B, KV, T, D], CT))
        return g.model(opset, overridable)


def _vi(name: str, shape: list, elem_type: int = 1):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, shape)


FAMILY = LlamaFamily()
