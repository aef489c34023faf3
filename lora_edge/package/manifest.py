"""The package format's one definition: manifest.json as frozen dataclasses.

Written by the compile side (:func:`lora_edge.package.store.write_package_manifest`), read by every device-side
reader through :func:`Manifest.from_json`, which validates the whole document once: a reader never looks up
a string key. docs/package-format.md describes each field; tests/golden/manifest.json is a reviewed example.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field

from ..config import Attention, LoraDtype, Mode, Target, WeightType
from ..errors import PackageError

FORMAT = "lora-edge-package"
# 2 adds the recipe and the native kernel's features; 1 is read as 2 without them.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
EMBEDDING = "model.embed_tokens"  # the token embedding's slot (embedding LoRA: lora_embedding_A/B)
ALORA_MASK = "lora.alora_mask"  # activated LoRA's (batch, seq, 1) mask: 1 where the branches apply
# an activated adapter's file carries its invocation tokens as this int64 tensor (never bound: no graph input)
INVOCATION_TOKENS = "lora.alora_invocation_tokens"
# mixed-adapter batches: every branch's x @ A times a (batch, 1, rank) mask that keeps each row's own adapter's columns
# of the adapters stacked along the rank; a chunked branch (one B per module) reads it as (batch, 1, 1, 1, rank)
ROW_MASK = "lora.row_mask"
ROW_MASK_CHUNKS = "lora.row_mask_chunks"
# how many of the last positions get logits, an int64 (1,) input whose default 0 keeps them all (what verify and
# ONNX Runtime GenAI read): generation asks for the last only, so a long prompt's (seq, vocab) logits never exist
LOGITS_TO_KEEP = "logits_to_keep"
CUSTOM_RECIPE = "custom"


@dataclass(frozen=True)
class DecoderSpec:
    """The shapes and constants a graph was built with (decoders and encoders alike)."""

    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_attention_scaling: float = 1.0
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head, before RoPE
    # Gemma / Gemma 2
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma's (1 + w)
    embed_scale: float = 1.0  # embeddings times sqrt(hidden)
    activation: str = "silu"  # of the gated MLP: silu | gelu_tanh
    attn_scale: float | None = None  # None: head_dim**-0.5 (Gemma 2: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # scores = cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    sandwich_norms: bool = False  # Gemma 2: norms after attention and MLP too (pre/post feed-forward)
    # GPT-2
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    positions: str = "rope"  # rope | learned (an embedding table by position id, no rotary)
    mlp_gated: bool = True  # act(gate) * up, or act(up) alone
    # encoders (BERT, RoBERTa): no KV cache, bidirectional attention, post-norm layers
    kind: str = "decoder"  # decoder | encoder
    type_vocab_size: int = 0  # token type (segment) embeddings
    num_labels: int = 0  # > 0: a sequence-classification head, whose logits are an output
    head: str = "none"  # none | bert (pooler dense+tanh on [CLS], then classifier) | roberta (classifier.dense+tanh, out_proj)
    position_offset: int = -1  # RoBERTa: positions count non-padding tokens from pad_token_id + 1 (-1: 0, 1, 2, ...)

    @property
    def is_encoder(self) -> bool:
        return self.kind == "encoder"


@dataclass(frozen=True)
class LinearModule:
    """A linear layer an adapter may target: y = x @ W.T, W of shape (out_features, in_features)."""

    path: str  # the name inside lora-edge (graph, slots, manifest), e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    peft_path: str = ""  # the module's name in the PyTorch model, which adapters use; "" = path

    @property
    def peft(self) -> str:
        return self.peft_path or self.path


@dataclass(frozen=True)
class BaseInfo:
    source: str
    sha256: str  # of the weight file(s)
    identity: int  # 31 bits of sha256: every adapter file's model_version
    spec: DecoderSpec


@dataclass(frozen=True)
class Quantization:
    weights: WeightType
    block_size: int
    embeddings: WeightType
    algo: str
    accuracy_level: int
    tensors: dict[str, int]  # weight type -> how many tensors are stored so
    zero: str | None = None  # None: float weights
    calibration: str | None = None  # GPTQ's text: "built-in" or a path
    int8_modules: tuple[str, ...] = ()
    float_modules: tuple[str, ...] = ()
    bytes: dict[str, int] | None = None  # embeddings / linear / other


@dataclass(frozen=True)
class BlobLayout:
    """The w8a8 blob: one adapter input holding every q8x branch (layout: lora_edge.native.contract.BLOB_FIELDS)."""

    name: str
    slots: tuple[tuple[str, str, int, int], ...]  # (lora_A, lora_B, chunks, chunk width) per branch, in blob order


@dataclass(frozen=True)
class KernelInfo:
    """lora-edge's native operators: the runtime registers a kernel of ``version`` or newer."""

    version: int
    dtype: LoraDtype
    features: tuple[str, ...] = ()  # what the graph writer emitted (lora_edge.native.contract.Feature)
    blob: BlobLayout | None = None
    name: str = "native"


@dataclass(frozen=True)
class TensorIO:
    name: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphInfo:
    file: str  # model.onnx or model.ort
    target: Target
    opset: int
    compute_dtype: str  # of the KV cache and the LoRA tensors: float32 | float16
    attention: Attention
    null_rank: int
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    lora_kernel: KernelInfo | None = None
    alora_mask: str | None = None  # activated LoRA: the (batch, seq, 1) input that switches the branches per position
    row_mask: str | None = None  # mixed-adapter batches: the (batch, 1, rank) input that picks each row's adapter
    logits_to_keep: str | None = None  # the (1,) input that limits the logits to the last positions (LOGITS_TO_KEEP)

    @property
    def fused(self) -> bool:
        return self.attention is Attention.FUSED


@dataclass(frozen=True)
class SlotPart:
    module: str
    out_features: int


@dataclass(frozen=True)
class Chunks:
    width: int
    modules: tuple[int, ...]  # the module (index into parts) of each chunk of B


@dataclass(frozen=True)
class SlotInfo:
    """One LoRA branch: its overridable graph inputs and which adapters bind them."""

    name: str
    in_features: int
    out_features: int
    parts: tuple[SlotPart, ...]
    lora_A: str
    lora_B: str
    adapters: tuple[str, ...] = ()
    lora_A_scale: str | None = None  # int8 A/B: one scale per column of A ...
    lora_B_scale: str | None = None  # ... and per row of B
    lora_B_chunks: Chunks | None = None
    lora_blob: int | None = None  # w8a8: this branch's index in the blob
    lora_M: str | None = None  # DoRA's magnitude scale
    lora_bias: str | None = None  # a trained bias change
    weight: str | None = None  # modules_to_save: the replaceable weight (in, out) ...
    bias_in: str | None = None  # ... and its bias


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    ranks: tuple[int, ...]
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    scalings: tuple[float, ...]
    target_modules: tuple[str, ...]
    modules: int
    parameters: int
    source: str
    source_sha256: str
    merged: bool
    file: str | None = None  # adapters/NAME.onnx_adapter; None when merged
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    alora_invocation_tokens: tuple[int, ...] | None = None  # activated LoRA: applies from this token sequence on

    @property
    def kind(self) -> str:
        return "dora" if self.use_dora else "rslora" if self.use_rslora else "lora"


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    lora_edge_version: str
    base: BaseInfo
    mode: Mode
    quantization: Quantization
    graph: GraphInfo
    slots: tuple[SlotInfo, ...]
    adapters: dict[str, AdapterInfo]
    tokenizer: dict[str, tuple[str, ...]]  # {"files": [...]}
    recipe: str = CUSTOM_RECIPE
    # every linear layer of the base and the modules an adapter may replace (modules_to_save): what a device
    # matches a PEFT adapter's target_modules against
    modules: tuple[LinearModule, ...] = ()
    replaceable: tuple[str, ...] = ()
    files: dict[str, FileEntry] = field(default_factory=dict)
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    # -- facts readers need ---------------------------------------------------------------
    @property
    def spec(self) -> DecoderSpec:
        return self.base.spec

    @property
    def kernel(self) -> KernelInfo | None:
        return self.graph.lora_kernel

    def adapter_files(self) -> dict[str, str]:
        """Adapter name -> its file, for every adapter that is not merged."""
        return {n: a.file for n, a in sorted(self.adapters.items()) if a.file}

    def size(self, prefix: str = "") -> int:
        return sum(f.bytes for name, f in self.files.items() if name.startswith(prefix))

    # -- JSON -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return json_of(self)

    @classmethod
    def from_json(cls, data: object, where: str = MANIFEST) -> Manifest:
        """Validate ``data`` (parsed JSON) as a manifest; a PackageError names the first wrong field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PackageError(f"{where} is not a lora-edge manifest; re-export the package")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PackageError(f"{where}: schema_version {version!r} is invalid; re-export the package")
        if version > SCHEMA_VERSION:
            from .. import __version__

            raise PackageError(
                f"{where} was written by lora-edge {data.get('lora_edge_version', '?')} (package schema {version}); "
                f"this lora-edge {__version__} reads schema {SCHEMA_VERSION} and older: upgrade lora-edge"
            )
        manifest = _from_json(cls, _upgrade(data), "manifest", where)
        if not manifest.files:
            raise PackageError(f"{where} lists no files; re-export the package")
        _check_spec(manifest.spec, where)
        return manifest


SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
         "max_position_embeddings")
MAX_SIZE = 1 << 24  # far beyond any model's: a size past it is a broken manifest, not a model


def _check_spec(spec: DecoderSpec, where: str) -> None:
    """The shapes a runtime allocates and loops over are sizes: positive and bounded."""
    for name in SIZES:
        value = getattr(spec, name)
        if not 1 <= value <= MAX_SIZE:
            raise PackageError(f"{where}: base.spec.{name} is {value}, not a size between 1 and {MAX_SIZE}; re-export the package")


def _upgrade(data: dict) -> dict:
    """Schema 1 -> 2: no recipe and no kernel features were recorded (the kernel's version says what it needs)."""
    return {**data, "schema_version": SCHEMA_VERSION}


# -- the generic part: dataclass <-> JSON by the annotated types --------------------------
def json_of(obj):
    """A manifest record (or any value in one) as plain JSON data."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and f.default is None:
                continue  # optional and absent: not written
            out[f.name] = json_of(value)
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: json_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_of(v) for v in obj]
    return obj


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _from_json(tp, value, path: str, where: str):
    def bad(what: str):
        return PackageError(f"{where}: {path} {what}; re-export the package")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:
            try:
                return _from_json(a, value, path, where)
            except PackageError:
                pass
        return _from_json(args[-1], value, path, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"must be an object, got {type(value).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _from_json(hints[f.name], value[f.name], f"{path}.{f.name}", where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise bad(f"has no field {f.name!r}")
        return tp(**kwargs)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad(f"must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"must have {len(args)} items, got {len(value)}")
        return tuple(_from_json(a, v, f"{path}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad(f"must be an object, got {type(value).__name__}")
        return {k: _from_json(val_tp, v, f"{path}[{k!r}]", where) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise bad(f"is {value!r}, not one of {', '.join(m.value for m in tp)}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise bad(f"must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"manifest field type {tp!r} is not handled")  # a bug in this module, not in the file
