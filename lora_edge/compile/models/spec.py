"""Architecture-neutral description of a loaded base model (compile side, but torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...native.contract import scale_names
from ...package.manifest import DecoderSpec, LinearModule


@dataclass
class BaseModel:
    """What the loader hands to the exporter: spec, float32 weights by HF name, tokenizer files."""

    spec: DecoderSpec
    weights: dict[str, np.ndarray]  # HF state-dict names, float32, HF layout (out, in)
    rope_inv_freq: np.ndarray  # (head_dim/2,) float32, exactly what the PyTorch model uses
    hf_config: dict
    tokenizer_files: dict[str, bytes]
    source: Path
    sha256: str  # of the weight file(s): the base identity adapters are checked against
    linear_modules: dict[str, LinearModule] = field(default_factory=dict)
    other_modules: frozenset[str] = frozenset()  # module paths that exist but are not LoRA-able here
    replaceable: frozenset[str] = frozenset()  # modules an adapter may replace outright (modules_to_save)
    source_blocks: str | None = None  # a GGUF base's weight type ("Q4_0", "Q4_1", "F16", ...); None otherwise

    def weight_of(self, module: str) -> np.ndarray | None:
        """The float weight of ``module`` (out, in); a tied lm_head's is the embedding table."""
        w = self.weights.get(f"{module}.weight")
        if w is None and module == "lm_head" and self.spec.tie_word_embeddings:
            w = self.weights.get("model.embed_tokens.weight")
        return w

    def bias_of(self, module: str) -> np.ndarray | None:
        return self.weights.get(f"{module}.bias")

    @property
    def identity(self) -> int:
        """A 31-bit number from the weights' hash, stored as each adapter file's model_version."""
        return int(self.sha256[:8], 16) & 0x7FFFFFFF


# Narrower chunks would make the batched B product many tiny matmuls; keep those groups block-diagonal.
MIN_CHUNK_WIDTH = 32


@dataclass(frozen=True)
class Slot:
    """One LoRA branch in the graph: a group of linear layers that read the same input (q/k/v, gate/up,
    or a single module), and the two overridable graph inputs that feed it.

    ``<name>.lora_A``: (in, r) — the A matrices of the group's modules side by side;
    ``<name>.lora_B``: (r, sum(out)) — their B matrices block-diagonal, so one pair of small matmuls
    serves the whole group. ``r`` is symbolic: every adapter brings its own.

    A group whose outputs are whole multiples of one width ``c`` (q/k/v under GQA: c = kv_heads*head_dim;
    gate/up: c = intermediate) keeps B without the block-diagonal zeros: ``lora_B`` is (chunks, r_m, c),
    chunk j of module ``chunk_modules[j]``, every module at the same rank r_m (A: (in, n_modules*r_m),
    lower ranks zero-padded), and the graph multiplies each chunk by its module's slice of x@A in one
    batched MatMul. For rank 16 on SmolLM2's seven projections this reads 19.5 MB per token instead of 29.
    """

    name: str
    in_features: int
    parts: tuple[tuple[str, int], ...]  # (module path, out_features), in output order
    # some adapter of the package is DoRA on one of these modules: the slot also takes <name>.lora_M,
    # the per-output-channel magnitude scale (ones when the bound adapter is not DoRA here)
    dora: bool = False
    # some adapter of the package brings trained biases (PEFT bias="all"/"lora_only") for these modules:
    # the slot also takes <name>.lora_bias, the change of the bias (zeros when the adapter has none)
    bias: bool = False
    # some adapter replaces this (single) module outright (PEFT modules_to_save, e.g. a classifier head):
    # its weight and bias are inputs <name>.weight.T / <name>.bias_in whose defaults are the base's
    replace: bool = False

    @property
    def out_features(self) -> int:
        return sum(o for _, o in self.parts)

    @property
    def chunk_width(self) -> int:
        """Width c of B's chunks (0: B is one block-diagonal (r, out) matrix)."""
        if len(self.parts) < 2:
            return 0
        c = math.gcd(*(o for _, o in self.parts))
        return c if c >= MIN_CHUNK_WIDTH else 0

    @property
    def chunk_modules(self) -> tuple[int, ...]:
        """For each chunk of B, the index of the module (in ``parts``) whose output it is."""
        c = self.chunk_width
        return tuple(i for i, (_, o) in enumerate(self.parts) for _ in range(o // c)) if c else ()

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.parts)

    @property
    def a_name(self) -> str:
        return f"{self.name}.lora_A"

    @property
    def b_name(self) -> str:
        return f"{self.name}.lora_B"

    @property
    def scale_names(self) -> tuple[str, str]:
        """The int8 scales of lora_A / lora_B (packages with --lora-dtype int8)."""
        return scale_names(self.a_name, self.b_name)

    @property
    def m_name(self) -> str:
        return f"{self.name}.lora_M"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.lora_bias"

    @property
    def weight_name(self) -> str:  # a replaced module's weight, (in, out)
        return f"{self.name}.weight.T"

    @property
    def replaced_bias_name(self) -> str:
        return f"{self.name}.bias_in"

    @property
    def rank_dim(self) -> str:
        return f"rank.{self.name}"

    @property
    def module_rank_dim(self) -> str:  # the per-module rank of a chunked B
        return f"rank.{self.name}.module"
