"""GPT2LMHeadModel on the Llama graph, under lora-edge's internal names.

What differs, and how it is compiled:
- Conv1D layers store their weight (in, out) (PEFT: ``fan_in_fan_out``); they are transposed once at
  load to the (out, in) layout of every other family, so merging and the graph need no special case.
  LoRA tensors have the same shapes as for nn.Linear.
- LayerNorm with bias (``LayerNormalization`` / ``SkipLayerNormalization``), learned position
  embeddings added to the token embeddings, no rotary embedding (GroupQueryAttention with as many KV
  heads as heads), an ungated MLP with GELU's tanh approximation (``gelu_new``), biases everywhere.
- ``c_attn`` is one module for q/k/v (one LoRA branch over its output, split afterwards, as Phi-3).

The model's module names (``transformer.h.N.attn.c_attn``, ...) are what adapters use; inside the
package, modules have the Llama names (``model.layers.N.self_attn.qkv_proj``, ...): each
``LinearModule`` records both.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .llama import LlamaFamily
from .spec import DecoderSpec, LinearModule

# PyTorch name -> internal name (weights and modules)
_RENAMES = [
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.wpe\.", "model.embed_positions."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.attn\.c_attn\.", r"model.layers.\1.self_attn.qkv_proj."),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc\.", r"model.layers.\1.mlp.up_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."),
]
_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _internal(name: str) -> str:
    for pat, rep in _RENAMES:
        if re.match(pat, name):
            return re.sub(pat, rep, name)
    return name


class GPT2Family(LlamaFamily):
    hf_fused = True  # c_attn holds q, k and v

    def spec_from_hf(self, hf_model) -> tuple[DecoderSpec, np.ndarray]:
        from ...errors import ModelError

        cfg = hf_model.config
        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelError(f"GPT-2 activation {cfg.activation_function!r} is not supported yet (gelu_new is)")
        if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
            raise ModelError("GPT-2 attention variants (scale_attn_weights=False, scale_attn_by_inverse_layer_idx, "
                             "reorder_and_upcast_attn) are not supported yet")  # fmt: skip
        spec = DecoderSpec(
            family=self.name, architecture=type(hf_model).__name__, hidden_size=cfg.n_embd, num_layers=cfg.n_layer,
            num_heads=cfg.n_head, num_kv_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
            intermediate_size=cfg.n_inner or 4 * cfg.n_embd, vocab_size=cfg.vocab_size, rms_norm_eps=float(cfg.layer_norm_epsilon),
            tie_word_embeddings=bool(cfg.tie_word_embeddings), max_position_embeddings=int(cfg.n_positions),
        )  # fmt: skip
        spec = dataclasses.replace(spec, norm="layer", positions="learned", mlp_gated=False, activation="gelu_tanh")
        return spec, np.zeros(0, np.float32)

    def internal_weights(self, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, w in state_dict.items():
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):  # old checkpoints' causal-mask buffers
                continue
            out[_internal(name)] = np.ascontiguousarray(w.T) if _CONV1D.match(name) else w
        return out

    def linear_modules(self, spec: DecoderSpec) -> dict[str, LinearModule]:
        h, ff = spec.hidden_size, spec.intermediate_size
        out: dict[str, LinearModule] = {}
        for i in range(spec.num_layers):
            for peft, dims in ((f"transformer.h.{i}.attn.c_attn", (h, 3 * h)), (f"transformer.h.{i}.attn.c_proj", (h, h)),
                               (f"transformer.h.{i}.mlp.c_fc", (h, ff)), (f"transformer.h.{i}.mlp.c_proj", (ff, h))):  # fmt: skip
                path = _internal(peft + ".").rstrip(".")
                out[path] = LinearModule(path, *dims, peft_path=peft)
        out["lm_head"] = LinearModule("lm_head", h, spec.vocab_size)
        return out

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]:
        names = {"transformer", "transformer.wte", "transformer.wpe", "transformer.ln_f", "transformer.drop", "transformer.h"}
        for i in range(spec.num_layers):
            p = f"transformer.h.{i}"
            names |= {p, f"{p}.ln_1", f"{p}.ln_2", f"{p}.attn", f"{p}.mlp", f"{p}.mlp.act", f"{p}.mlp.dropout",
                      f"{p}.attn.attn_dropout", f"{p}.attn.resid_dropout"}  # fmt: skip
        return frozenset(names)

    def groups(self, spec: DecoderSpec, fused: bool) -> list[tuple[str, tuple[str, ...]]]:
        out = []
        for i in range(spec.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            out += [(p, (p,)) for p in (f"{a}.qkv_proj", f"{a}.o_proj", f"{m}.up_proj", f"{m}.down_proj")]
        return out + [("lm_head", ("lm_head",))]


FAMILY = GPT2Family("gpt2", ("GPT2LMHeadModel",))
