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
targeted by an adapter (see :class:`~lora_edge.compile.models.spec.Slot`) also gets ``y += (x @ A) @ B`` with
A, B overridable graph inputs (``<group>.lora_A``: (in, r), ``<group>.lora_B``: (r, out), or (chunks, r_m, c)
without block-diagonal zeros; the LoRA scaling already folded into B). The emitters of these pieces are in
``lora_edge/compile/graph/``; :class:`DecoderGraph` below puts them in the decoder's order.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..graph.activation import activation, softcap
from ..graph.attention import DecoderInputs, FusedAttention, ReferenceAttention
from ..graph.builder import GraphBuilder
from ..graph.embedding import token_embedding
from ..graph.emitters import Emitters
from ..graph.options import GraphOptions
from ..graph.weights import EMBED_WEIGHT
from ...package.manifest import LOGITS_TO_KEEP
from .spec import BaseModel, DecoderSpec, LinearModule, Slot

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
B, S, P, T = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"  # symbolic dimensions


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
    def build_graph(self, base: BaseModel, weights: dict, slots: dict[str, Slot], options: GraphOptions) -> onnx.ModelProto:
        """The ModelProto; the LoRA inputs are overridable initializers (rank-``options.null_rank`` zeros).

        ``weights`` maps HF names to float arrays or :class:`QTensor`. ``options.fused`` writes ONNX Runtime's
        fused operators (GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization, one matmul per
        q/k/v and gate/up group); otherwise standard ONNX ops only."""
        return DecoderGraph(self, base, weights, slots, options).build()


class DecoderGraph:
    """One decoder graph being written, step by step; the family's differences come from its spec (read from
    the model) and from the family object (its groups, and whether q/k/v and gate/up are single modules)."""

    def __init__(self, family: LlamaFamily, base: BaseModel, weights: dict, slots: dict[str, Slot],
                 options: GraphOptions) -> None:  # fmt: skip
        self.family, self.spec, self.weights, self.slots, self.options = family, base.spec, weights, slots, options
        self.g = GraphBuilder(f"lora-edge {self.spec.architecture}")
        self.io = self.inputs()
        self.parts = Emitters.build(self.g, self.spec, weights, slots, options)
        self.linear, self.norm = self.parts.linear, self.parts.norm
        if options.fused:
            self.attention = FusedAttention(self.g, self.spec, base.rope_inv_freq, self.io, options.ct)
        else:
            self.attention = ReferenceAttention(self.g, self.spec, base.rope_inv_freq, self.io)
        self.groups = dict(family.groups(self.spec, options.fused))

    def build(self) -> onnx.ModelProto:
        x, residual, table = self.embedding()
        for i in range(self.spec.num_layers):
            x, residual = self.layer(i, x, residual)
        kept = self.keep_last(x)
        self.outputs(self.logits(x if kept is None else kept, table))
        overridable = self.parts.adapter_inputs(self.slots, self.weights, self.options)
        if kept is not None:
            overridable[LOGITS_TO_KEEP] = (np.zeros(1, np.int64), [1])
        return self.g.model(self.options.opset, overridable)

    def keep_last(self, x: str) -> str | None:
        """The final hidden states of the last ``logits_to_keep`` positions (0: all). A decoding step needs one row of
        logits; without this a prompt of S tokens makes (S, vocab) of them, 190 MiB for 1,000 tokens of SmolLM2's
        vocabulary, which ONNX Runtime's arena then keeps. None where an activated adapter branches the head: its
        per-position mask spans every position."""
        if self.options.alora and "lm_head" in self.slots:
            return None
        g = self.g
        start = g.op("Neg", [LOGITS_TO_KEEP])
        return g.op("Slice", [x, start, g.const([np.iinfo(np.int64).max]), g.const([1])])

    def inputs(self) -> DecoderInputs:
        """The ONNX Runtime GenAI / Optimum decoder inputs; the KV cache in the compute dtype."""
        g, spec, ct = self.g, self.spec, self.options.ct
        ids, mask, positions = (g.input(name, np.int64, shape) for name, shape in
                                (("input_ids", [B, S]), ("attention_mask", [B, T]), ("position_ids", [B, S])))  # fmt: skip
        cache = [B, spec.num_kv_heads, P, spec.head_dim]
        past = [tuple(g.input(f"past_key_values.{i}.{kv}", ct, cache) for kv in ("key", "value")) for i in range(spec.num_layers)]
        return DecoderInputs(input_ids=ids, attention_mask=mask, position_ids=positions, past=past)

    def embedding(self) -> tuple[str, str, str | None]:
        """(the first layer's normed input, the residual stream, the float embedding table for a tied head)."""
        g, spec, ct = self.g, self.spec, self.options.ct
        with g.scoped("embed"):
            residual, table = token_embedding(g, self.parts.store, self.options, self.weights, self.slots, self.io.input_ids)
            if spec.embed_scale != 1.0:  # Gemma: after the lookup (and its LoRA), as the model does
                residual = g.op("Mul", [residual, g.const(spec.embed_scale, ct)])
            if spec.positions == "learned":  # GPT-2: a table of position embeddings, gathered by position id
                positions = g.weight("model.embed_positions.weight", self.weights["model.embed_positions.weight"].astype(ct))
                residual = g.op("Add", [residual, g.op("Gather", [positions, self.io.position_ids], axis=0)])
            return self.norm(residual, "model.layers.0.input_layernorm.weight"), residual, table

    def layer(self, i: int, x: str, residual: str) -> tuple[str, str]:
        """One decoder layer: attention and MLP around the residual stream; returns the next layer's (normed
        input, residual) (the last layer's: the final norm's)."""
        g, spec, p = self.g, self.spec, f"model.layers.{i}"
        with g.scoped(p):
            q, k, v = self.qkv(p, x)
            (o,) = self.linear.group(self.attend(i, q, k, v), f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj",))
            if spec.sandwich_norms:  # Gemma 2: norm the attention output, then the MLP input
                o = self.norm(o, f"{p}.post_attention_layernorm.weight")
                x, residual = self.norm.add(residual, o, f"{p}.pre_feedforward_layernorm.weight")
            else:
                x, residual = self.norm.add(residual, o, f"{p}.post_attention_layernorm.weight")
            down = self.mlp(p, x)
            if spec.sandwich_norms:
                down = self.norm(down, f"{p}.post_feedforward_layernorm.weight")
            nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < spec.num_layers else "model.norm.weight"
            return self.norm.add(residual, down, nxt)

    def qkv(self, p: str, x: str) -> tuple[str, str, str]:
        """q (B, S, H*D), k and v (B, S, KV*D)."""
        a, spec = f"{p}.self_attn", self.spec
        if self.family.hf_fused:  # one module in the model: its LoRA is one branch, its output is split here
            (qkv,) = self.linear.group(x, f"{a}.qkv_proj", (f"{a}.qkv_proj",))
            sizes = [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2
            return tuple(self.g.op("Split", [qkv, self.g.const(sizes)], n_out=3, axis=-1))
        if self.options.fused:
            return tuple(self.linear.group(x, f"{a}.qkv_proj", self.groups[f"{a}.qkv_proj"]))
        (q,), (k,), (v,) = (self.linear.group(x, f"{a}.{n}", (f"{a}.{n}",)) for n in ("q_proj", "k_proj", "v_proj"))
        return q, k, v

    def attend(self, i: int, q: str, k: str, v: str) -> str:
        """Causal attention over past + new keys (Qwen3: per-head RMSNorm of q and k first); (B, S, H*D)."""
        spec = self.spec
        if spec.qk_norm:
            q = self.head_norm(q, spec.num_heads, f"model.layers.{i}.self_attn.q_norm.weight")
            k = self.head_norm(k, spec.num_kv_heads, f"model.layers.{i}.self_attn.k_norm.weight")
        return self.attention(i, q, k, v)

    def head_norm(self, x: str, n: int, weight_name: str) -> str:  # the norm over head_dim of each of n heads
        g, D = self.g, self.spec.head_dim
        heads = g.op("Reshape", [x, g.const([0, 0, n, D])])  # (B, S, n, D)
        return g.op("Reshape", [self.norm(heads, weight_name), g.const([0, 0, n * D])])  # (B, S, n*D)

    def mlp(self, p: str, x: str) -> str:
        """down(act(gate(x)) * up(x)), or GPT-2's ungated down(act(up(x)))."""
        g, spec, m = self.g, self.spec, f"{p}.mlp"

        def act(t: str) -> str:
            return activation(g, spec.activation, t, self.options.fused, self.options.ct)

        if not spec.mlp_gated:
            (up,) = self.linear.group(x, f"{m}.up_proj", (f"{m}.up_proj",))
            hidden = act(up)
        else:
            if self.family.hf_fused:
                (gate_up,) = self.linear.group(x, f"{m}.gate_up_proj", (f"{m}.gate_up_proj",))
                gate, up = g.op("Split", [gate_up, g.const([spec.intermediate_size] * 2)], n_out=2, axis=-1)
            elif self.options.fused:
                gate, up = self.linear.group(x, f"{m}.gate_up_proj", self.groups[f"{m}.gate_up_proj"])
            else:
                (gate,), (up,) = (self.linear.group(x, f"{m}.{n}", (f"{m}.{n}",)) for n in ("gate_proj", "up_proj"))
            hidden = g.op("Mul", [act(gate), up])
        (down,) = self.linear.group(hidden, f"{m}.down_proj", (f"{m}.down_proj",))
        return down

    def logits(self, x: str, table: str | None) -> str:
        """(B, S, V) in the compute dtype; a tied head reads the embedding's own weights, never a transposed copy."""
        g, spec = self.g, self.spec
        with g.scoped("head"):
            if "lm_head.weight" in self.weights:  # untied, or tied but merged with an lm_head delta
                (logits,) = self.linear.group(x, "lm_head", ("lm_head",))
            elif table is None:  # quantized: the embedding's MatMulNBits initializers
                terms = self.parts.projections.quantized(x, EMBED_WEIGHT, self.weights[EMBED_WEIGHT])
                logits = self.linear.with_lora(x, "lm_head", terms)
            else:
                flat = g.op("Reshape", [x, g.const([-1, spec.hidden_size])])  # (B*S, h)
                logits2d = g.op("Gemm", [flat, table], transB=1)  # (B*S, V)
                batch_seq = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])])  # [B, S]
                dims = g.op("Concat", [batch_seq, g.const([spec.vocab_size])], axis=0)  # [B, S, V]
                logits = self.linear.with_lora(x, "lm_head", [g.op("Reshape", [logits2d, dims])])  # (B, S, V)
            if spec.final_softcap:
                logits = softcap(g, logits, spec.final_softcap, self.options.ct)
            return logits

    def outputs(self, logits: str) -> None:
        """logits (float32 whatever the compute dtype), and the present KV cache the attention wrote."""
        g, spec, opts = self.g, self.spec, self.options
        if opts.ct is not np.float32:
            logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
        g.output(logits, "logits", np.float32, [B, "kept_sequence", spec.vocab_size])
        cache = [B, spec.num_kv_heads, T, spec.head_dim]
        for i in range(spec.num_layers):
            for kv in ("key", "value"):  # the attention's nodes already write them under these names
                g.output(f"present.{i}.{kv}", f"present.{i}.{kv}", opts.ct, cache)


FAMILY = LlamaFamily()
