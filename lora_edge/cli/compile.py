"""`export` and `verify`: the compile side's commands (torch, onnx are imported when they run)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..config import AdapterSpec, Attention, LoraDtype, LoraKernel, Mode, QuantAlgo, Target, WeightType, ZeroPoint
from ..recipes import DEFAULT as DEFAULT_RECIPE
from ..recipes import Recipe, describe_recipes, export_config
from .app import choice, cli

_QUIET = click.option("--quiet", is_flag=True, help="No progress lines or bars on stderr (bars show only on a terminal).")


@cli.command(epilog="\b\nRecipes (--recipe; any flag below overrides the recipe's value):\n" + describe_recipes())
@click.argument("base", type=click.Path(path_type=Path))
@click.option("-a", "--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter directory; repeat for more. NAME becomes adapters/NAME.onnx_adapter.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Package directory to create.")
@click.option("-r", "--recipe", type=choice(Recipe), default=DEFAULT_RECIPE.value, show_default=True,
              help="The measured best options for an intent (listed below); the flags after --force override it.")
@click.option("--mode", type=choice(Mode), default=Mode.BRANCH.value, show_default=True,
              help="branch: adapters stay switchable per call on one graph. merge: fold exactly one adapter into the weights "
                   "(several adapters with merge is an error: export once per adapter). Merging before int4 can cost accuracy: "
                   "check with `lora-edge verify`.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an existing lora-edge package (nothing else is ever deleted).")
@click.option("-q", "--quant", type=choice(WeightType), default=None,
              help="Base weights: fp32, fp16 (stored half, computed fp32), int8 or int4 (block-wise MatMulNBits). LoRA stays float.")
@click.option("--target", type=choice(Target), default=None,
              help="cpu: model.onnx, float32 compute. mobile: model.ort (ORT format) + the operator config for a reduced "
                   "ORT build. cuda: float16 compute and LoRA tensors.")
@click.option("--lora-kernel", type=choice(LoraKernel), default=None,
              help="onnx: LoRA branches as standard MatMuls (any onnxruntime). native: lora-edge's own operators (threaded; "
                   "at int4 they run the projections too; --target cpu); the device needs `lora-edge build-kernel`.")
@click.option("--lora-dtype", type=choice(LoraDtype), default=None,
              help="With --lora-kernel native: how A/B are stored. float16; int8: one scale per rank, half the bytes "
                   "(~0.7% relative error in the branch's output); w8a8: int8 laid out for integer dot products, the "
                   "branch's activations in int8 too (the fastest branch; ~1% relative error in the branch's output).")
@click.option("--block-size", type=int, default=None, help="Quantization block size (16-256, power of two); default 16 for int8, 32 for int4.")
@click.option("--zero", type=choice(ZeroPoint), default=None,
              help="Block zero points: int (uint8), none (symmetric) or float (fp16 offsets, run as a small correction). "
                   "Default: float for int4, int for int8.")
@click.option("--quant-algo", type=choice(QuantAlgo), default=None,
              help="gptq (default): error-compensating, calibrated on a text; search: per-block clipping search; rtn: round-to-nearest.")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Calibration text for GPTQ (default: a mixed-genre text shipped with lora-edge).")
@click.option("--embeddings", type=choice(WeightType), default=None,
              help="Embedding (and tied lm_head) precision; default int8 when --quant is int8/int4.")
@click.option("--int8-modules", multiple=True, metavar="PATTERN", help="With --quant int4: modules kept at 8 bits (e.g. down_proj).")
@click.option("--float-modules", multiple=True, metavar="PATTERN", help="Modules left in float32.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits compute: 4 = int8 activations (default; fastest on CPU), 0 = float32.")
@click.option("--attention", type=choice(Attention), default=Attention.FUSED.value, show_default=True,
              help="fused: ONNX Runtime's fused operators (fast; unpadded batches). reference: standard ONNX ops only.")
@click.option("--null-rank", type=click.IntRange(0, 1), default=None,
              help="Rank of the 'no adapter' defaults: 0 (empty: no branch work; default for cpu/mobile) or 1 (zeros, "
                   "works on every provider; default for cuda).")
@click.option("--alora", is_flag=True,
              help="Give the graph activated LoRA's per-position mask, to add activated adapters later (on by itself when "
                   "an exported adapter has alora_invocation_tokens).")
@click.option("--mixed-batches/--no-mixed-batches", default=None,
              help="Give the graph a per-row mask over the rank so one call serves requests of different adapters "
                   "(serve's batches; one Mul per branch). Default: on for standard-op branch packages with fused attention.")
@_QUIET
def export(base: Path, adapters: tuple[str, ...], output: Path, recipe: str, mode: str, force: bool, quiet: bool, **flags) -> None:
    """Compile BASE (a Hugging Face model directory or a .gguf file) and adapters into a package.

    \b
    Examples:
      lora-edge export ./SmolLM2-135M-Instruct -a pirate=adapters/pirate -a shout=adapters/shout -o pkg/
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-fast/ --recipe fastest
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-phone/ --recipe mobile
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-merged/ --mode merge --recipe portable
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-int8/ --recipe portable --quant int8
    """
    from ..compile.pipeline import export as do_export
    from ..compile.progress import Reporter

    start = time.perf_counter()
    cfg = _export_config(base, adapters, output, recipe, mode, force, flags)
    result = do_export(cfg, progress=Reporter(start, quiet=quiet))
    m = result.manifest
    click.echo(f"wrote {result.path} ({m.size() / 2**20:.1f} MiB, {len(m.adapters)} adapter(s), recipe {m.recipe}) "
               f"in {time.perf_counter() - start:.1f}s")  # fmt: skip


_QUANT_FLAGS = {"quant": "weights", "block_size": "block_size", "zero": "zero", "quant_algo": "algo", "calibration": "calibration",
                "embeddings": "embeddings", "accuracy_level": "accuracy_level"}  # fmt: skip


def _export_config(base, adapters, output, recipe, mode, force, flags):
    """The recipe's options with every flag the user gave in their place."""
    quant = {field: flags[flag] for flag, field in _QUANT_FLAGS.items() if flags[flag] is not None}
    quant.update({k: tuple(flags[k]) for k in ("int8_modules", "float_modules") if flags[k]})
    options = {k: flags[k] for k in ("target", "lora_kernel", "lora_dtype", "null_rank", "mixed_batches") if flags[k] is not None}
    return export_config(recipe, quant=quant, base=base, output=output, adapters=tuple(AdapterSpec.parse(a) for a in adapters),
                         mode=Mode(mode), force=force, attention=Attention(flags["attention"]), alora=flags["alora"],
                         **options)  # fmt: skip


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The base model (HF directory or .gguf); default: the path recorded in the manifest.")
@click.option("-a", "--adapter", "adapters", multiple=True, metavar="NAME[=PATH]",
              help="Adapters to check (default: all); =PATH overrides the PEFT source recorded in the manifest.")
@click.option("--text", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Text for perplexity and logit comparison (default: a 625-token text shipped with lora-edge).")
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Use at most this many tokens of the text.")
@click.option("--greedy-tokens", type=int, default=32, show_default=True, help="Greedy tokens to compare (0 to skip).")
@click.option("--prompt", default="What is the capital of Italy?", show_default=True, help="Prompt for the greedy comparison.")
@click.option("--max-ppl-increase", type=float, default=None, help="Fail (exit 1) if perplexity rises more than this many percent.")
@click.option("--min-top1", type=float, default=None, help="Fail (exit 1) if clear-winner top-1 agreement is below this percent.")
@click.option("--provider", "providers", multiple=True, metavar="NAME", help="Execution provider for the package (repeat for a fallback order).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_QUIET
def verify(package, reference, adapters, text, max_tokens, greedy_tokens, prompt, max_ppl_increase, min_top1, providers, as_json,
           quiet) -> None:  # fmt: skip
    """Compare PACKAGE with the PyTorch + PEFT original: logits, KL, top-1, perplexity, adapter effect, greedy tokens.

    \b
    Examples:
      lora-edge verify pkg/
      lora-edge verify pkg-int4/ --adapter pirate --text my_corpus.txt --json
      lora-edge verify pkg-int8/ --max-ppl-increase 1 --min-top1 98      # exit 1 if not met
    """
    from ..compile.progress import Reporter
    from ..compile.verify import VerifyConfig, render
    from ..compile.verify import verify as do_verify

    names, paths = [], {}
    for a in adapters:
        name, sep, path = a.partition("=")
        names.append(name)
        if sep:
            paths[name] = Path(path)
    cfg = VerifyConfig(package=package, reference=reference, adapters=tuple(names), adapter_paths=paths, text=text,
                       max_tokens=max_tokens, greedy_tokens=greedy_tokens, prompt=prompt,
                       max_ppl_increase=max_ppl_increase, min_top1=min_top1, providers=providers)  # fmt: skip
    report = do_verify(cfg, progress=Reporter(quiet=quiet))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render(report))
    if not report.passed:
        sys.exit(1)
