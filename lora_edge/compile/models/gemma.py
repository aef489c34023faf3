"""GemmaForCausalLM and Gemma2ForCausalLM on the Llama graph, with what they change:

- RMSNorm multiplies by (1 + w) (folded into the norm weights at compile time);
- embeddings are scaled by sqrt(hidden) after the lookup;
- the gated MLP uses GELU's tanh approximation (``gelu_pytorch_tanh``; ONNX Runtime's FastGelu);
- Gemma 2: attention scale query_pre_attn_scalar**-0.5, attention-score and final-logit soft-capping
  (GroupQueryAttention's ``softcap``), norms after attention and MLP as well ("sandwich"), and
  alternating sliding-window layers (exact within the window: the context is capped at it).
"""

from __future__ import annotations

import dataclasses
import math

from .llama import LlamaFamily
from .spec import DecoderSpec


class GemmaFamily(LlamaFamily):
    def spec_from_hf(self, hf_model):
        from ...errors import ModelError

        spec, inv_freq = super().spec_from_hf(hf_model)
        cfg = hf_model.config
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelError(f"Gemma MLP activation {act!r} is not supported yet (gelu_pytorch_tanh is)")
        extra = dict(norm_offset=1.0, embed_scale=math.sqrt(cfg.hidden_size), activation="gelu_tanh")
        if hasattr(hf_model.model.layers[0], "pre_feedforward_layernorm"):  # Gemma 2
            extra.update(attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5, sandwich_norms=True,
                         attn_softcap=getattr(cfg, "attn_logit_softcapping", None) or None,
                         final_softcap=getattr(cfg, "final_logit_softcapping", None) or None)  # fmt: skip
        return dataclasses.replace(spec, **extra), inv_freq

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]:
        names = set(super().other_modules(spec))
        for i in range(spec.num_layers):
            names |= {f"model.layers.{i}.pre_feedforward_layernorm", f"model.layers.{i}.post_feedforward_layernorm"}
        return frozenset(names)


FAMILY = GemmaFamily("gemma", ("GemmaForCausalLM", "Gemma2ForCausalLM"))
