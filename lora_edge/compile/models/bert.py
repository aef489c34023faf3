"""BERT-style encoders: BertModel, RobertaModel and their ...ForSequenceClassification.

The graph (no KV cache): word + position + token-type embeddings and LayerNorm; per layer,
bidirectional multi-head attention over the unpadded positions (attention_mask), then post-norm
residuals (``SkipLayerNormalization`` when fused) around attention and the GELU (erf) MLP. Outputs:
``last_hidden_state`` (batch, seq, hidden), and ``logits`` (batch, num_labels) for a classification
model (BERT: pooler dense+tanh on the first token, then the classifier; RoBERTa: classifier.dense +
tanh, then out_proj). Position ids are an input: the runtime computes them (RoBERTa counts the
non-padding tokens from pad_token_id + 1, as transformers does).

The same switchable LoRA slots as decoders (q/k/v grouped when fused, every dense layer a slot), and
the classification head can be *replaced* per adapter (PEFT's ``modules_to_save``, which a
sequence-classification adapter always has): its weight and bias are inputs whose defaults are the
base's.
"""

from __future__ import annotations

import numpy as np

from ...errors import ModelError, UnsupportedFeatureError
from ..graph.builder import GraphBuilder
from ..graph.ops import linear_ops
from .spec import BaseModel, DecoderSpec, LinearModule, Slot

_AUTO = {"BertModel": "AutoModel", "RobertaModel": "AutoModel", "BertForSequenceClassification": "AutoModelForSequenceClassification",
         "RobertaForSequenceClassification": "AutoModelForSequenceClassification"}  # fmt: skip


def _prefix(arch: str) -> str:
    """Where the encoder lives in the model's module tree."""
    if arch.endswith("ForSequenceClassification"):
        return "roberta." if arch.startswith("Roberta") else "bert."
    return ""


class BertFamily:
    name = "bert"
    architectures = tuple(_AUTO)
    hf_fused = False

    def auto_class(self, architecture: str) -> str:
        return _AUTO[architecture]

    # -- reading the PyTorch model (compile side) ------------------------------------------
    def spec_from_hf(self, hf_model) -> tuple[DecoderSpec, np.ndarray]:
        cfg = hf_model.config
        arch = type(hf_model).__name__
        if getattr(cfg, "hidden_act", "gelu") != "gelu":
            raise ModelError(f"encoder activation {cfg.hidden_act!r} is not supported yet (gelu is)")
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"position_embedding_type {cfg.position_embedding_type!r} is not supported yet (absolute is)")
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise ModelError("BERT-style models used as decoders are not supported")
        classify = arch.endswith("ForSequenceClassification")
        if classify and getattr(cfg, "problem_type", None) not in (None, "single_label_classification", "multi_label_classification"):
            raise ModelError(f"problem_type {cfg.problem_type!r} is not supported yet")
        roberta = arch.startswith("Roberta")
        spec = DecoderSpec(
            family=self.name, architecture=arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_attention_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, rms_norm_eps=float(cfg.layer_norm_eps),
            tie_word_embeddings=False, max_position_embeddings=int(cfg.max_position_embeddings) - (cfg.pad_token_id + 1 if roberta else 0),
            norm="layer", positions="learned", mlp_gated=False, activation="gelu", kind="encoder",
            type_vocab_size=int(getattr(cfg, "type_vocab_size", 0) or 0), num_labels=int(cfg.num_labels) if classify else 0,
            head=("roberta" if roberta else "bert") if classify else ("pooler" if getattr(hf_model, "pooler", None) is not None else "none"),
            position_offset=int(cfg.pad_token_id) if roberta else -1,
        )  # fmt: skip
        if classify and not roberta and getattr(hf_model.bert, "pooler", None) is None:
            raise ModelError("a BERT classifier without its pooler is not supported")
        return spec, np.zeros(0, np.float32)

    def internal_weights(self, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in state_dict.items() if not k.endswith("position_ids") and not k.endswith("token_type_ids")}

    def _layer(self, spec: DecoderSpec, i: int) -> str:
        return f"{_prefix(spec.architecture)}encoder.layer.{i}"

    def linear_modules(self, spec: DecoderSpec) -> dict[str, LinearModule]:
        h, ff = spec.hidden_size, spec.intermediate_size
        out: dict[str, LinearModule] = {}
        for i in range(spec.num_layers):
            p = self._layer(spec, i)
            for name, dims in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)), ("attention.self.value", (h, h)),
                               ("attention.output.dense", (h, h)), ("intermediate.dense", (h, ff)), ("output.dense", (ff, h))):  # fmt: skip
                out[f"{p}.{name}"] = LinearModule(f"{p}.{name}", *dims)
        for name, dims in self._head(spec):
            out[name] = LinearModule(name, *dims)
        return out

    def _head(self, spec: DecoderSpec) -> list[tuple[str, tuple[int, int]]]:
        h, n = spec.hidden_size, spec.num_labels
        if spec.head == "bert":
            return [("bert.pooler.dense", (h, h)), ("classifier", (h, n))]
        if spec.head == "roberta":
            return [("classifier.dense", (h, h)), ("classifier.out_proj", (h, n))]
        if spec.head == "pooler":  # BertModel's pooler_output: dense + tanh on the first token
            return [(f"{_prefix(spec.architecture)}pooler.dense", (h, h))]
        return []

    def replaceable(self, spec: DecoderSpec) -> frozenset[str]:
        """Modules an adapter may replace outright (modules_to_save): the classification head."""
        if not spec.num_labels:
            return frozenset()
        return frozenset(name for name, _ in self._head(spec)) | ({"classifier"} if spec.head == "roberta" else set())

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]:
        pre = _prefix(spec.architecture)
        names = {f"{pre}embeddings", f"{pre}embeddings.word_embeddings", f"{pre}embeddings.position_embeddings",
                 f"{pre}embeddings.token_type_embeddings", f"{pre}embeddings.LayerNorm", f"{pre}encoder"}  # fmt: skip
        for i in range(spec.num_layers):
            p = self._layer(spec, i)
            names |= {p, f"{p}.attention", f"{p}.attention.self", f"{p}.attention.output", f"{p}.attention.output.LayerNorm",
                      f"{p}.intermediate", f"{p}.output", f"{p}.output.LayerNorm"}  # fmt: skip
        return frozenset(names)

    def groups(self, spec: DecoderSpec, fused: bool) -> list[tuple[str, tuple[str, ...]]]:
        out = []
        for i in range(spec.num_layers):
            p = self._layer(spec, i)
            qkv = tuple(f"{p}.attention.self.{n}" for n in ("query", "key", "value"))
            out += [(f"{p}.attention.self.qkv", qkv)] if fused else [(m, (m,)) for m in qkv]
            out += [(f"{p}.{n}", (f"{p}.{n}",)) for n in ("attention.output.dense", "intermediate.dense", "output.dense")]
        return out + [(name, (name,)) for name, _ in self._head(spec)]

    # -- writing the graph -------------------------------------------------------------------
    def build_graph(self, base: BaseModel, weights: dict, slots: dict[str, Slot], opset: int, null_rank: int,
                    store_fp16: bool = False, accuracy_level: int = 4, fused: bool = True, compute_dtype: str = "float32",
                    lora_kernel: str = "onnx", lora_dtype: str = "float16"):  # fmt: skip
        spec = base.spec
        if compute_dtype != "float32":
            raise UnsupportedFeatureError("encoders compute in float32 only (no --target cuda yet)")
        g = GraphBuilder(f"lora-edge {spec.architecture}")
        B, S = "batch_size", "sequence_length"
        H, D, h = spec.num_heads, spec.head_dim, spec.hidden_size
        f32 = np.float32
        pre = _prefix(spec.architecture)
        ops = linear_ops(g, spec, weights, slots, f32, store_fp16, accuracy_level, fused, lora_kernel, lora_dtype)
        overridable = ops.adapter_inputs(null_rank)

        input_ids = g.input("input_ids", np.int64, [B, S])
        attn_mask = g.input("attention_mask", np.int64, [B, S])
        position_ids = g.input("position_ids", np.int64, [B, S])
        token_types = g.input("token_type_ids", np.int64, [B, S]) if spec.type_vocab_size else None

        g.scope = "embed"
        e = f"{pre}embeddings"
        x = g.op("Gather", [ops.float_weight(f"{e}.word_embeddings.weight", weights[f"{e}.word_embeddings.weight"]), input_ids], axis=0)
        x = g.op("Add", [x, g.op("Gather", [g.weight(f"{e}.position_embeddings.weight", weights[f"{e}.position_embeddings.weight"]), position_ids], axis=0)])
        if token_types is not None:
            table = g.weight(f"{e}.token_type_embeddings.weight", weights[f"{e}.token_type_embeddings.weight"])
            x = g.op("Add", [x, g.op("Gather", [table, token_types], axis=0)])
        x = ops.norm(x, f"{e}.LayerNorm.weight")  # LayerNorm: spec.norm == "layer"

        g.scope = "mask"  # (B, 1, 1, S): 0 where a key may be attended to, the float minimum where it is padding
        keep = g.op("Unsqueeze", [g.op("Cast", [attn_mask], to=9), g.const([1, 2])])
        bias = g.op("Where", [keep, g.const(0.0, f32), g.const(np.finfo(f32).min, f32)])

        def heads(t: str) -> str:  # (B, S, h) -> (B, H, S, D)
            return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, H, D])])], perm=[0, 2, 1, 3])

        for i in range(spec.num_layers):
            p = self._layer(spec, i)
            g.scope = p
            names = tuple(f"{p}.attention.self.{n}" for n in ("query", "key", "value"))
            if fused:
                q, k, v = ops.group_linear(x, f"{p}.attention.self.qkv", names)
            else:
                (q,), (k,), (v,) = (ops.group_linear(x, m, (m,)) for m in names)
            scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [heads(q), g.op("Transpose", [heads(k)], perm=[0, 1, 3, 2])]),
                                                g.const(D**-0.5, f32)]), bias])  # fmt: skip
            ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), heads(v)])
            ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, h])])
            (o,) = ops.group_linear(ctx, f"{p}.attention.output.dense", (f"{p}.attention.output.dense",))
            x, _ = ops.add_norm(x, o, f"{p}.attention.output.LayerNorm.weight")
            (up,) = ops.group_linear(x, f"{p}.intermediate.dense", (f"{p}.intermediate.dense",))
            act = g.op("Mul", [g.op("Mul", [up, g.const(0.5, f32)]),
                               g.op("Add", [g.op("Erf", [g.op("Div", [up, g.const(np.sqrt(2.0), f32)])]), g.const(1.0, f32)])])  # fmt: skip
            (down,) = ops.group_linear(act, f"{p}.output.dense", (f"{p}.output.dense",))
            x, _ = ops.add_norm(x, down, f"{p}.output.LayerNorm.weight")

        g.scope = ""
        g.output(x, "last_hidden_state", f32, [B, S, h])
        if spec.head != "none":
            g.scope = "head"
            first = g.op("Squeeze", [g.op("Slice", [x, g.const([0]), g.const([1]), g.const([1])]), g.const([1])])  # (B, h)
            dense, *out = (name for name, _ in self._head(spec))
            (hid,) = ops.group_linear(first, dense, (dense,))
            g.scope = ""
            if not out:
                g.output(g.op("Tanh", [hid]), "pooler_output", f32, [B, h])
            else:
                (logits,) = ops.group_linear(g.op("Tanh", [hid]), out[0], (out[0],))
                g.output(logits, "logits", f32, [B, spec.num_labels])
        return g.model(opset, overridable)


FAMILY = BertFamily()
