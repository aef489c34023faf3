"""Named recipes: the measured best export options per intent, so a user picks a device, not a flag set.

``lora-edge export --recipe NAME`` starts from a recipe and lets any flag given override it; the package's
manifest records which recipe its options match (``custom`` when they match none), and ``inspect`` shows it.
docs/performance.md has the figures behind each choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config import Choice, ExportConfig, LoraDtype, LoraKernel, QuantConfig, Target, WeightType


class Recipe(Choice):
    EXACT = "exact"
    PORTABLE = "portable"
    FASTEST = "fastest"
    MOBILE = "mobile"
    GPU = "gpu"


@dataclass(frozen=True)
class RecipeOptions:
    summary: str  # one line for --help and inspect
    quant: QuantConfig = field(default_factory=QuantConfig)
    target: Target = Target.CPU
    lora_kernel: LoraKernel = LoraKernel.ONNX
    lora_dtype: LoraDtype = LoraDtype.FLOAT16

    def export_fields(self) -> dict:
        return {"quant": self.quant, "target": self.target, "lora_kernel": self.lora_kernel, "lora_dtype": self.lora_dtype}


_INT4 = QuantConfig(weights=WeightType.INT4)  # GPTQ, block 32, float offsets, int8 embeddings, int8 activations

RECIPES: dict[Recipe, RecipeOptions] = {
    Recipe.EXACT: RecipeOptions("fp32 weights, standard ONNX ops: PyTorch + PEFT to float rounding; the largest"),
    Recipe.PORTABLE: RecipeOptions("int4 weights, standard ONNX ops: any onnxruntime and ONNX Runtime GenAI, no build step",
                                   quant=_INT4),
    Recipe.FASTEST: RecipeOptions("int4 weights on lora-edge's native kernel with w8a8 adapters: the fastest CPU decode; "
                                  "the device runs `lora-edge build-kernel` once",
                                  quant=_INT4, lora_kernel=LoraKernel.NATIVE, lora_dtype=LoraDtype.W8A8),
    Recipe.MOBILE: RecipeOptions("int4 weights in ORT format with the operator config of a reduced onnxruntime build",
                                 quant=_INT4, target=Target.MOBILE),
    Recipe.GPU: RecipeOptions("int4 weights, float16 compute and adapters for CUDA", quant=_INT4, target=Target.CUDA),
}
DEFAULT = Recipe.EXACT


def export_config(recipe: Recipe | str = DEFAULT, quant: dict | None = None, **options) -> ExportConfig:
    """An ExportConfig from ``recipe``, with ``options`` (ExportConfig fields) and ``quant`` (QuantConfig fields)
    replacing the recipe's values: ``export_config("fastest", base=..., output=..., quant={"block_size": 64})``."""
    chosen = RECIPES[Recipe.parse(recipe, "recipe")]
    fields = chosen.export_fields()
    fields["quant"] = replace(chosen.quant, **(quant or {}))
    return ExportConfig(**{**fields, **options})


def recipe_of(cfg: ExportConfig) -> str:
    """The name of the recipe whose options ``cfg`` has, else "custom"."""
    for name, r in RECIPES.items():
        if (cfg.quant.effective(), cfg.target, cfg.lora_kernel, cfg.lora_dtype) == (r.quant.effective(), r.target, r.lora_kernel, r.lora_dtype) \
                and cfg.fused and cfg.null_rank == ExportConfig(base=cfg.base, output=cfg.output, target=r.target).null_rank:
            return name.value
    return "custom"


def describe_recipes() -> str:
    return "\n".join(f"{name.value:<9} {r.summary}" for name, r in RECIPES.items())
