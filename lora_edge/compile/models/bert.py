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
import onnx

from ...errors import ModelError, UnsupportedFeatureError
from ..graph.activation import gelu_erf
from ..graph.attention import merge_heads, split_heads
from ..graph.builder import GraphBuilder
from ..graph.emitters import Emitters
from ..graph.options import GraphOptions
from .spec import BaseModel, DecoderSpec, LinearModule, Slot

_AUTO = {"BertModel": "AutoModel", "RobertaModel": "AutoModel", "BertForSequenceClassification": "AutoModelForSequenceClassification",
         "RobertaForSequenceClassification": "AutoModelForSequenceClassification"}  # fmt: skip
B, S = "batch_size", "sequence_length"  # symbolic dimensions


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

    def layer_name(self, spec: DecoderSpec, i: int) -> str:
        return f"{_prefix(spec.architecture)}encoder.layer.{i}"

    def linear_modules(self, spec: DecoderSpec) -> dict[str, LinearModule]:
        h, ff = spec.hidden_size, spec.intermediate_size
        out: dict[str, LinearModule] = {}
        for i in range(spec.num_layers):
            p = self.layer_name(spec, i)
            for name, dims in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)), ("attention.self.value", (h, h)),
                               ("attention.output.dense", (h, h)), ("intermediate.dense", (h, ff)), ("output.dense", (ff, h))):  # fmt: skip
                out[f"{p}.{name}"] = LinearModule(f"{p}.{name}", *dims)
        for name, dims in self.head_modules(spec):
            out[name] = LinearModule(name, *dims)
        return out

    def head_modules(self, spec: DecoderSpec) -> list[tuple[str, tuple[int, int]]]:
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
        return frozenset(name for name, _ in self.head_modules(spec)) | ({"classifier"} if spec.head == "roberta" else set())

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]:
        pre = _prefix(spec.architecture)
        names = {f"{pre}embeddings", f"{pre}embeddings.word_embeddings", f"{pre}embeddings.position_embeddings",
                 f"{pre}embeddings.token_type_embeddings", f"{pre}embeddings.LayerNorm", f"{pre}encoder"}  # fmt: skip
        for i in range(spec.num_layers):
            p = self.layer_name(spec, i)
            names |= {p, f"{p}.attention", f"{p}.attention.self", f"{p}.attention.output", f"{p}.attention.output.LayerNorm",
                      f"{p}.intermediate", f"{p}.output", f"{p}.output.LayerNorm"}  # fmt: skip
        return frozenset(names)

    def groups(self, spec: DecoderSpec, fused: bool) -> list[tuple[str, tuple[str, ...]]]:
        out = []
        for i in range(spec.num_layers):
            p = self.layer_name(spec, i)
            qkv = tuple(f"{p}.attention.self.{n}" for n in ("query", "key", "value"))
            out += [(f"{p}.attention.self.qkv", qkv)] if fused else [(m, (m,)) for m in qkv]
            out += [(f"{p}.{n}", (f"{p}.{n}",)) for n in ("attention.output.dense", "intermediate.dense", "output.dense")]
        return out + [(name, (name,)) for name, _ in self.head_modules(spec)]

    # -- writing the graph -------------------------------------------------------------------
    def build_graph(self, base: BaseModel, weights: dict, slots: dict[str, Slot], options: GraphOptions) -> onnx.ModelProto:
        if options.compute_dtype != "float32":
            raise UnsupportedFeatureError("encoders compute in float32 only (no --target cuda yet)")
        return EncoderGraph(self, base, weights, slots, options).build()


class EncoderGraph:
    """One encoder graph being written, step by step."""

    def __init__(self, family: BertFamily, base: BaseModel, weights: dict, slots: dict[str, Slot], options: GraphOptions) -> None:
        self.family, self.spec, self.weights, self.slots, self.options = family, base.spec, weights, slots, options
        self.g = GraphBuilder(f"lora-edge {self.spec.architecture}")
        self.parts = Emitters.build(self.g, self.spec, weights, slots, options)
        self.linear, self.norm = self.parts.linear, self.parts.norm

    def build(self) -> onnx.ModelProto:
        g, spec = self.g, self.spec
        ids, mask, positions, token_types = self.inputs()
        x = self.embedding(ids, positions, token_types)
        bias = self.mask(mask)
        for i in range(spec.num_layers):
            x = self.layer(i, x, bias)
        g.output(x, "last_hidden_state", np.float32, [B, S, spec.hidden_size])
        if spec.head != "none":
            self.head(x)
        return g.model(self.options.opset, self.parts.adapter_inputs(self.slots, self.weights, self.options))

    def inputs(self) -> tuple[str, str, str, str | None]:
        """input_ids, attention_mask, position_ids (computed by the runtime), token_type_ids if the model has them."""
        g = self.g
        ids, mask, positions = (g.input(name, np.int64, [B, S]) for name in ("input_ids", "attention_mask", "position_ids"))
        return ids, mask, positions, g.input("token_type_ids", np.int64, [B, S]) if self.spec.type_vocab_size else None

    def embedding(self, ids: str, positions: str, token_types: str | None) -> str:
        """Word + position (+ token type) embeddings, then LayerNorm."""
        g, e = self.g, f"{_prefix(self.spec.architecture)}embeddings"
        with g.scoped("embed"):
            words = self.parts.store.float(f"{e}.word_embeddings.weight", self.weights[f"{e}.word_embeddings.weight"])
            x = g.op("Gather", [words, ids], axis=0)
            table = g.weight(f"{e}.position_embeddings.weight", self.weights[f"{e}.position_embeddings.weight"])
            x = g.op("Add", [x, g.op("Gather", [table, positions], axis=0)])
            if token_types is not None:
                table = g.weight(f"{e}.token_type_embeddings.weight", self.weights[f"{e}.token_type_embeddings.weight"])
                x = g.op("Add", [x, g.op("Gather", [table, token_types], axis=0)])
            return self.norm(x, f"{e}.LayerNorm.weight")

    def mask(self, mask: str) -> str:
        """(B, 1, 1, S): 0 where a key may be attended to, the float minimum where it is padding."""
        g, f32 = self.g, np.float32
        with g.scoped("mask"):
            keep = g.op("Unsqueeze", [g.op("Cast", [mask], to=9), g.const([1, 2])])
            return g.op("Where", [keep, g.const(0.0, f32), g.const(np.finfo(f32).min, f32)])

    def layer(self, i: int, x: str, bias: str) -> str:
        """Post-norm residuals around bidirectional attention and the GELU (erf) MLP."""
        g, p = self.g, self.family.layer_name(self.spec, i)
        with g.scoped(p):
            names = tuple(f"{p}.attention.self.{n}" for n in ("query", "key", "value"))
            if self.options.fused:
                q, k, v = self.linear.group(x, f"{p}.attention.self.qkv", names)
            else:
                (q,), (k,), (v,) = (self.linear.group(x, m, (m,)) for m in names)
            ctx = self.attention(q, k, v, bias)
            (o,) = self.linear.group(ctx, f"{p}.attention.output.dense", (f"{p}.attention.output.dense",))
            x, _ = self.norm.add(x, o, f"{p}.attention.output.LayerNorm.weight")
            (up,) = self.linear.group(x, f"{p}.intermediate.dense", (f"{p}.intermediate.dense",))
            (down,) = self.linear.group(gelu_erf(g, up), f"{p}.output.dense", (f"{p}.output.dense",))
            x, _ = self.norm.add(x, down, f"{p}.output.LayerNorm.weight")
            return x

    def attention(self, q: str, k: str, v: str, bias: str) -> str:
        """softmax(q k^T / sqrt(D) + mask) v over all heads: (B, S, h) each -> (B, S, h)."""
        g, H, D = self.g, self.spec.num_heads, self.spec.head_dim
        q = split_heads(g, q, H, D)  # (B, H, S, D)
        scores = g.op("MatMul", [q, g.op("Transpose", [split_heads(g, k, H, D)], perm=[0, 1, 3, 2])])  # (B, H, S, S)
        scores = g.op("Add", [g.op("Mul", [scores, g.const(D**-0.5, np.float32)]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), split_heads(g, v, H, D)])  # (B, H, S, D)
        return merge_heads(g, ctx, self.spec.hidden_size)  # (B, S, h)

    def head(self, x: str) -> None:
        """On the first token: dense + tanh, then (a classifier) the output projection to the labels."""
        g, spec = self.g, self.spec
        dense, *out = (name for name, _ in self.family.head_modules(spec))
        with g.scoped("head"):
            first = g.op("Squeeze", [g.op("Slice", [x, g.const([0]), g.const([1]), g.const([1])]), g.const([1])])  # (B, h)
            (hid,) = self.linear.group(first, dense, (dense,))
        if not out:
            g.output(g.op("Tanh", [hid]), "pooler_output", np.float32, [B, spec.hidden_size])
        else:
            (logits,) = self.linear.group(g.op("Tanh", [hid]), out[0], (out[0],))
            g.output(logits, "logits", np.float32, [B, spec.num_labels])


FAMILY = BertFamily()
