"""Typed, validated options. Built once from the CLI or by a Python caller; never a dict of strings."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

# An adapter name becomes a file name (adapters/NAME.onnx_adapter) and a CLI token.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    if not _SAFE_NAME.match(name) or name.endswith(".") or ".." in name:
        raise InputError(
            f"adapter name {name!r} is not a safe file name; use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


class Mode(str, enum.Enum):
    """How adapters reach the graph."""

    BRANCH = "branch"  # low-rank branches with overridable A/B inputs; adapters switch per call
    MERGE = "merge"  # W + s*B*A folded into the weights; one adapter, no branches


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter NAME=PATH``."""

    name: str
    path: Path

    def __post_init__(self) -> None:
        check_adapter_name(self.name)

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """Parse ``NAME=PATH``; a bare PATH takes the directory's name."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text.rstrip("/\\")).name
        if not path:
            raise InputError(f"--adapter {text!r} has no path; write NAME=PATH, e.g. pirate=adapters/pirate")
        return cls(name=name, path=Path(path))


QUANT_ALGOS = ("gptq", "search", "rtn")
LORA_KERNELS = ("onnx", "native")  # how a LoRA branch runs: ExportConfig.lora_kernel
LORA_DTYPES = ("float16", "int8", "w8a8")  # how the native kernel stores A and B: ExportConfig.lora_dtype


class WeightType(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # stored as float16, computed in float32 (halves the download, not the RAM)
    INT8 = "int8"  # MatMulNBits, 8 bits
    INT4 = "int4"  # MatMulNBits, 4 bits

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.value)


@dataclass(frozen=True)
class QuantConfig:
    """How the base weights are stored. LoRA branches always stay float32 (one base serves every adapter)."""

    weights: WeightType = WeightType.FP32
    # None: 16 in an int8 recipe (accuracy level 4 also quantizes activations per block: finer blocks keep
    # int8 within 1% perplexity), 32 in an int4 recipe (the size budget).
    block_size: int | None = None
    # Block zero points: "int" (uint8, MatMulNBits' own), "none" (symmetric), "float" (fp16 offsets run as a
    # small correction next to MatMulNBits; fp16 scales). None: "float" for int4, "int" for int8.
    zero: str | None = None
    # "gptq": error-compensating, calibrated on a text (the default recipe for int4); "search": per-block
    # clipping search for least squared error; "rtn": plain round-to-nearest (ONNX Runtime's own).
    algo: str = "gptq"
    calibration: Path | None = None  # GPTQ calibration text; None: the text shipped with lora-edge
    # The token embedding (and a tied lm_head, which shares it). None: int8 when weights are int4/int8.
    embeddings: WeightType | None = None
    int8_modules: tuple[str, ...] = ()  # in an int4 recipe, modules kept at 8 bits (names, suffixes or regexes)
    float_modules: tuple[str, ...] = ()  # modules left in float
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fastest on CPU), 0/1 = float32 compute

    def __post_init__(self) -> None:
        from .quant import check_params

        object.__setattr__(self, "weights", WeightType(self.weights))
        if self.embeddings is not None:
            object.__setattr__(self, "embeddings", WeightType(self.embeddings))
        if self.block_size is not None:
            check_params(4, self.block_size)
        if self.zero is not None and self.zero not in ("int", "none", "float"):
            raise InputError(f"zero point kind must be int, none or float, got {self.zero!r}")
        if self.algo not in QUANT_ALGOS:
            raise InputError(f"quantization algorithm must be one of {', '.join(QUANT_ALGOS)}, got {self.algo!r}")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise InputError(f"calibration text {self.calibration} does not exist; give a UTF-8 text file")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy level must be 0-4, got {self.accuracy_level}")
        if self.embeddings is WeightType.FP16 and self.weights is not WeightType.FP16:
            raise InputError("--embeddings fp16 is only available with --quant fp16")
        for pat in self.int8_modules + self.float_modules:
            try:
                re.compile(pat)
            except re.error as exc:
                raise InputError(f"module pattern {pat!r} is not a valid regular expression ({exc})") from None

    @property
    def block(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return 16 if self.weights is WeightType.INT8 else 32

    @property
    def has_float_offsets(self) -> bool:
        """Whether the recipe's linear weights carry float block offsets (a correction beside MatMulNBits)."""
        return bool(self.weights.bits) and self.zero_for(self.weights) == "float"

    def zero_for(self, wtype: WeightType) -> str:
        if self.zero is not None:
            return self.zero
        return "float" if wtype is WeightType.INT4 else "int"

    @property
    def embedding_type(self) -> WeightType:
        if self.embeddings is not None:
            return self.embeddings
        return WeightType.INT8 if self.weights.bits else self.weights

    def to_json(self) -> dict:
        return {
            "weights": self.weights.value,
            "block_size": self.block,
            "zero": self.zero_for(self.weights) if self.weights.bits else None,
            "algo": self.algo,
            "calibration": None if self.algo != "gptq" else (str(self.calibration) if self.calibration else "built-in"),
            "embeddings": self.embedding_type.value,
            "int8_modules": list(self.int8_modules),
            "float_modules": list(self.float_modules),
            "accuracy_level": self.accuracy_level,
        }


def module_matches(patterns: tuple[str, ...], module: str) -> bool:
    """PEFT-style: exact name, a dotted suffix ("mlp.down_proj"), or a regex matching the whole name."""
    return any(module == p or module.endswith("." + p) or re.fullmatch(p, module) for p in patterns)


@dataclass(frozen=True)
class ExportConfig:
    base: Path
    output: Path
    adapters: tuple[AdapterSpec, ...] = ()
    mode: Mode = Mode.BRANCH
    force: bool = False
    opset: int = 17
    # Rank of the "no adapter" defaults of the branch inputs. 0 (empty tensors: the branch computes
    # nothing, 3% faster decode here) on the CPU and mobile targets; 1 (zeros, which work on every
    # provider: rank 0 is reported to fail on CUDA/DirectML) for cuda. None: by target.
    null_rank: int | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    # ONNX Runtime's fused operators (GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization,
    # q/k/v and gate/up as one matmul). False: standard ONNX ops only, any execution provider, padded batches.
    fused: bool = True
    # Where it will run (lora_edge.targets.Target): "cpu", "mobile" (ORT format + reduced-build operator
    # config) or "cuda" (float16 compute).
    target: str = "cpu"
    # How a LoRA branch runs: "onnx" (standard MatMuls, float32 A/B: any ONNX Runtime) or "native"
    # (lora-edge's LoraDelta operator, float16 A/B, threaded: the runtime needs `lora-edge build-kernel`).
    # "native" also runs int4's float-offset correction in the kernel (BlockOffset, or inside LoraDelta),
    # merged exports included.
    lora_kernel: str = "onnx"
    # How the native kernel stores lora_A / lora_B: "float16", or "int8" (one float32 scale per rank: half
    # the bytes again, about 0.7% relative error in the branch's output on the example adapters).
    lora_dtype: str = "float16"

    @property
    def compute_dtype(self) -> str:
        return "float16" if self.target == "cuda" else "float32"

    def __post_init__(self) -> None:
        if self.target not in ("cpu", "mobile", "cuda"):
            raise InputError(f"target must be cpu, mobile or cuda, got {self.target!r}")
        if self.target != "cpu" and not self.fused:
            raise InputError(f"--target {self.target} builds on the fused graph; drop --attention reference")
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"adapter name {dupes[0]!r} is given twice; give every --adapter a distinct NAME")
        if self.mode is Mode.MERGE and len(self.adapters) != 1:
            raise InputError(
                f"--mode merge folds exactly one adapter into the weights, got {len(self.adapters)}; "
                "run one export per adapter, or use --mode branch to keep them switchable"
            )
        if self.lora_kernel not in LORA_KERNELS:
            raise InputError(f"LoRA kernel must be one of {', '.join(LORA_KERNELS)}, got {self.lora_kernel!r}")
        if self.lora_kernel == "native" and self.target != "cpu":
            raise InputError(f"--lora-kernel native runs on the CPU execution provider; use it with --target cpu, not {self.target}")
        if self.lora_kernel == "native" and self.mode is not Mode.BRANCH and not self.quant.has_float_offsets:
            raise InputError("--lora-kernel native runs LoRA branches and int4's float-offset correction; this merged "
                             "export has neither (use --mode branch, or an int4 recipe with --zero float)")
        if self.lora_dtype not in LORA_DTYPES:
            raise InputError(f"LoRA dtype must be one of {', '.join(LORA_DTYPES)}, got {self.lora_dtype!r}")
        if self.lora_dtype != "float16" and self.lora_kernel != "native":
            raise InputError(f"--lora-dtype {self.lora_dtype} is a storage of the native kernel; add --lora-kernel native")
        if self.null_rank is None:
            object.__setattr__(self, "null_rank", 1 if self.target == "cuda" else 0)
        if self.null_rank not in (0, 1):
            raise InputError(f"null_rank must be 0 or 1, got {self.null_rank}")
        if not 14 <= self.opset <= 21:
            raise InputError(f"opset must be between 14 and 21, got {self.opset}")
