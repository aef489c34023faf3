"""Phi3ForCausalLM (Phi-3, Phi-3.5 mini): the Llama graph, but q/k/v and gate/up are single modules in
the model (``qkv_proj``, ``gate_up_proj``), so adapters target the fused modules: each gets one LoRA
branch over its whole output, and the graph splits the sum (q | k | v, gate | up) afterwards."""

from __future__ import annotations

from .llama import LlamaFamily
from .spec import DecoderSpec, LinearModule


class Phi3Family(LlamaFamily):
    hf_fused = True

    def linear_modules(self, spec: DecoderSpec) -> dict[str, LinearModule]:
        h, q, kv, ff = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
        out: dict[str, LinearModule] = {}
        for i in range(spec.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            for path, dims in ((f"{a}.qkv_proj", (h, q + 2 * kv)), (f"{a}.o_proj", (q, h)), (f"{m}.gate_up_proj", (h, 2 * ff)),
                               (f"{m}.down_proj", (ff, h))):  # fmt: skip
                out[path] = LinearModule(path, *dims)
        out["lm_head"] = LinearModule("lm_head", h, spec.vocab_size)
        return out

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]:
        names = set(super().other_modules(spec))
        for i in range(spec.num_layers):
            names |= {f"model.layers.{i}.resid_attn_dropout", f"model.layers.{i}.resid_mlp_dropout", f"model.layers.{i}.mlp.activation_fn"}
        return frozenset(names)

    def groups(self, spec: DecoderSpec, fused: bool) -> list[tuple[str, tuple[str, ...]]]:
        out = []
        for i in range(spec.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            out += [(p, (p,)) for p in (f"{a}.qkv_proj", f"{a}.o_proj", f"{m}.gate_up_proj", f"{m}.down_proj")]
        return out + [("lm_head", ("lm_head",))]


FAMILY = Phi3Family("phi3", ("Phi3ForCausalLM",))
