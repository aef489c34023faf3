"""Typed, validated options: enums for every choice and frozen option objects built once from the CLI or
by a Python caller. Imports nothing of the package but its errors, so both sides can use it."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

# An adapter name becomes a file name (adapters/NAME.onnx_adapter) and a CLI token.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Choice(str, enum.Enum):
    """A string-valued option: compares equal to its value, and a wrong value is one clear line."""

    @classmethod
    def parse(cls, value, what: str):
        try:
            return cls(value)
        except ValueError:
            raise InputError(f"{what} must be one of {', '.join(cls.values())}, got {value!r}") from None

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]

    def __str__(self) -> str:
        return self.value


class Mode(Choice):
    """How adapters reach the graph."""

    BRANCH = "branch"  # low-rank branches with overridable A/B inputs; adapters switch per call
    MERGE = "merge"  # W + s*B*A folded into the weights; one adapter, no branches


class WeightType(Choice):
    FP32 = "fp32"
    FP16 = "fp16"  # stored as float16, computed in float32 (halves the download, not the RAM)
    INT8 = "int8"  # MatMulNBits, 8 bits
    INT4 = "int4"  # MatMulNBits, 4 bits

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.value)


class ZeroPoint(Choice):
    """Block zero points of a quantized weight."""

    INT = "int"  # uint8, MatMulNBits' own
    NONE = "none"  # symmetric blocks
    FLOAT = "float"  # fp16 offsets, run as a small correction beside MatMulNBits


class QuantAlgo(Choice):
    GPTQ = "gptq"  # error-compensating, calibrated on a text
    SEARCH = "search"  # per-block clipping search for least squared error, data-free
    RTN = "rtn"  # plain round-to-nearest (ONNX Runtime's own)


class Target(Choice):
    """Where a package will run (lora_edge.compile.targets says what each adds)."""

    CPU = "cpu"
    MOBILE = "mobile"  # ORT format + the operator config of a reduced build
    CUDA = "cuda"  # float16 compute


class Attention(Choice):
    FUSED = "fused"  # ONNX Runtime's fused operators: GroupQueryAttention, RotaryEmbedding, ...; unpadded batches
    REFERENCE = "reference"  # standard ONNX ops only: any execution provider, padded batches


class LoraKernel(Choice):
    """How a LoRA branch runs."""

    ONNX = "onnx"  # standard MatMuls, float A/B: any ONNX Runtime
    NATIVE = "native"  # lora-edge's own operators (lora_edge.native): the device needs `lora-edge build-kernel`


class LoraDtype(Choice):
    """How the native kernel stores lora_A / lora_B."""

    FLOAT16 = "float16"
    INT8 = "int8"  # one float32 scale per rank: half the bytes of float16
    W8A8 = "w8a8"  # int8 in the order of integer dot products, the branch's activations in int8 too

    @property
    def is_int8(self) -> bool:
        return self is not LoraDtype.FLOAT16


MIN_BLOCK, MAX_BLOCK = 16, 256


def check_block_size(block: int) -> None:
    """MatMulNBits takes power-of-two blocks of 16..256."""
    if not (MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
        raise InputError(f"block size must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}, got {block}")


def check_adapter_name(name: str) -> str:
    if not _SAFE_NAME.match(name) or name.endswith(".") or ".." in name:
        raise InputError(
            f"adapter name {name!r} is not a safe file name; use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


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


def _coerce(obj, name: str, kind: type[Choice], what: str, optional: bool = False) -> None:
    """Turn a string option of a frozen dataclass into its enum (a Python caller may pass either)."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    object.__setattr__(obj, name, kind.parse(value, what))


@dataclass(frozen=True)
class QuantConfig:
    """How the base weights are stored. LoRA branches always stay float (one base serves every adapter)."""

    weights: WeightType = WeightType.FP32
    # None: 16 in an int8 recipe (accuracy level 4 also quantizes activations per block: finer blocks keep
    # int8 within 1% perplexity), 32 in an int4 recipe (the size budget).
    block_size: int | None = None
    zero: ZeroPoint | None = None  # None: float for int4, int for int8
    algo: QuantAlgo = QuantAlgo.GPTQ  # the default recipe for int4
    calibration: Path | None = None  # GPTQ calibration text; None: the text shipped with lora-edge
    # The token embedding (and a tied lm_head, which shares it). None: int8 when weights are int4/int8.
    embeddings: WeightType | None = None
    int8_modules: tuple[str, ...] = ()  # in an int4 recipe, modules kept at 8 bits (names, suffixes or regexes)
    float_modules: tuple[str, ...] = ()  # modules left in float
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fastest on CPU), 0/1 = float32 compute

    def __post_init__(self) -> None:
        _coerce(self, "weights", WeightType, "weight type")
        _coerce(self, "embeddings", WeightType, "embedding type", optional=True)
        _coerce(self, "zero", ZeroPoint, "zero point kind", optional=True)
        _coerce(self, "algo", QuantAlgo, "quantization algorithm")
        object.__setattr__(self, "int8_modules", tuple(self.int8_modules))
        object.__setattr__(self, "float_modules", tuple(self.float_modules))
        if self.block_size is not None:
            check_block_size(self.block_size)
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
        return bool(self.weights.bits) and self.zero_for(self.weights) is ZeroPoint.FLOAT

    @property
    def kernel_base_work(self) -> bool:
        """Whether the native kernel runs part of a merged base: int4's float-offset correction, or the whole int4
        product (MatMulQ4: blocks of 32 at accuracy level 4, with float offsets or symmetric)."""
        return self.has_float_offsets or (self.weights is WeightType.INT4 and self.block == 32 and self.accuracy_level == 4
                                          and self.zero_for(self.weights) is ZeroPoint.NONE)  # fmt: skip

    def zero_for(self, wtype: WeightType) -> ZeroPoint:
        if self.zero is not None:
            return self.zero
        return ZeroPoint.FLOAT if wtype is WeightType.INT4 else ZeroPoint.INT

    def effective(self) -> tuple:
        """The options with every default resolved: two configs that store the same weights compare equal."""
        zero = self.zero_for(self.weights) if self.weights.bits else None
        return (self.weights, self.block, zero, self.algo, self.calibration, self.embedding_type, self.int8_modules,
                self.float_modules, self.accuracy_level)

    @property
    def embedding_type(self) -> WeightType:
        if self.embeddings is not None:
            return self.embeddings
        return WeightType.INT8 if self.weights.bits else self.weights


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
    # nothing) on the CPU and mobile targets; 1 (zeros, which work on every provider: rank 0 is reported
    # to fail on CUDA/DirectML) for cuda. None: by target.
    null_rank: int | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    attention: Attention = Attention.FUSED
    target: Target = Target.CPU
    # NATIVE also runs int4's float-offset correction and the int4 projections in the kernel, merged exports
    # included.
    lora_kernel: LoraKernel = LoraKernel.ONNX
    lora_dtype: LoraDtype = LoraDtype.FLOAT16
    # activated LoRA: the graph takes a per-position mask that switches every branch on from an adapter's invocation
    # tokens on (one Mul per branch). On by itself when an exported adapter is activated; set it to add some later.
    alora: bool = False
    # mixed-adapter batches: the graph takes a per-row mask over the rank of stacked adapters, so one call serves rows
    # with different adapters (one Mul per branch). None: on for standard-op branch packages with fused attention.
    mixed_batches: bool | None = None

    @property
    def fused(self) -> bool:
        return self.attention is Attention.FUSED

    @property
    def native(self) -> bool:
        return self.lora_kernel is LoraKernel.NATIVE

    @property
    def compute_dtype(self) -> str:
        return "float16" if self.target is Target.CUDA else "float32"

    def __post_init__(self) -> None:
        _coerce(self, "mode", Mode, "mode")
        _coerce(self, "attention", Attention, "attention")
        _coerce(self, "target", Target, "target")
        _coerce(self, "lora_kernel", LoraKernel, "LoRA kernel")
        _coerce(self, "lora_dtype", LoraDtype, "LoRA dtype")
        if self.target is not Target.CPU and not self.fused:
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
        if self.native and self.target is not Target.CPU:
            raise InputError(f"--lora-kernel native runs on the CPU execution provider; use it with --target cpu, not {self.target}")
        if self.native and self.mode is not Mode.BRANCH and not self.quant.kernel_base_work:
            raise InputError("--lora-kernel native runs LoRA branches and int4 products; this merged export has neither "
                             "(use --mode branch, or an int4 recipe with --zero float)")
        if self.alora and self.native:
            raise InputError("activated LoRA (--alora, or an adapter with alora_invocation_tokens) runs on standard-op branches; "
                             "use --lora-kernel onnx")  # fmt: skip
        if self.alora and self.mode is Mode.MERGE:
            raise InputError("an activated LoRA adapter applies from its invocation tokens on, so it cannot be merged; use --mode branch")
        if self.mixed_batches is None:
            object.__setattr__(self, "mixed_batches", self.mode is Mode.BRANCH and not self.native and self.fused)
        elif self.mixed_batches and (self.mode is not Mode.BRANCH or self.native):
            raise InputError("mixed-adapter batches need standard-op branches: use --mode branch with --lora-kernel onnx, "
                             "or drop --mixed-batches")  # fmt: skip
        if self.lora_dtype is not LoraDtype.FLOAT16 and not self.native:
            raise InputError(f"--lora-dtype {self.lora_dtype} is a storage of the native kernel; add --lora-kernel native")
        if self.null_rank is None:
            object.__setattr__(self, "null_rank", 1 if self.target is Target.CUDA else 0)
        if self.null_rank not in (0, 1):
            raise InputError(f"null_rank must be 0 or 1, got {self.null_rank}")
        if not 14 <= self.opset <= 21:
            raise InputError(f"opset must be between 14 and 21, got {self.opset}")
