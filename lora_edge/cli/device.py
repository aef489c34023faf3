"""`inspect`, `run` and `build-kernel`: the device side's commands."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .app import cli, progress_reporter


@cli.command("build-kernel")
@click.option("--ort-include", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="ONNX Runtime's include folder (holding onnxruntime_cxx_api.h, any release >= 1.21). Default: "
                   "$LORA_EDGE_ORT_INCLUDE, else the 1.21 headers shipped with lora-edge. Nothing is downloaded.")
@click.option("--cxx", default=None, help="C++ compiler (default: $CXX, c++, g++ or clang++).")
@click.option("--march", default="native", show_default=True, help="CPU to compile for (-march=...).")
@click.option("--force", is_flag=True, help="Rebuild even if this source is already built.")
def build_kernel(ort_include: Path | None, cxx: str | None, march: str, force: bool) -> None:
    """Build lora-edge's native LoRA kernel for this machine (for packages exported with --lora-kernel native).

    It goes to $LORA_EDGE_CACHE (default ~/.cache/lora-edge)/kernels; the runtime finds it there, or at
    $LORA_EDGE_KERNEL_LIB.

    \b
    Examples:
      lora-edge build-kernel
      lora-edge build-kernel --ort-include ~/onnxruntime-linux-x64-1.22.0/include
    """
    from ..native.build import build

    start = time.perf_counter()
    path = build(ort_include=ort_include, cxx=cxx, march=march, force=force, progress=progress_reporter(start))
    click.echo(f"kernel ready: {path}")


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(package: Path, as_json: bool) -> None:
    """Show what a package holds: recipe, base, quantization, kernel features, graph I/O, LoRA slots, adapters.

    \b
    Example:
      lora-edge inspect pkg/
    """
    from ..package.inspect import describe, describe_json, render

    info = describe(package)
    click.echo(json.dumps(describe_json(info), indent=2, sort_keys=True) if as_json else render(info))


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The user's message (the chat template is applied if the model has one).")
@click.option("-a", "--adapter", "adapters", multiple=True, metavar="CHOICE",
              help="Adapter to use: NAME, NAME@STRENGTH (e.g. pirate@0.5), a blend A@W+B@W (pirate@0.7+shout@0.3), or "
                   "'none' for the base. Repeat to compare answers side by side.")
@click.option("--load", "loads", multiple=True, metavar="NAME=PATH",
              help="Load an adapter for this run: an .onnx_adapter compiled for the package, or a PEFT adapter directory.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(1, None), default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--do-sample", is_flag=True, help="Sample instead of taking the most likely token (transformers' semantics).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0, None), default=0, help="Keep the k most likely tokens (0: off).")
@click.option("--top-p", type=float, default=1.0, help="Keep the smallest set of tokens whose probability reaches p (1: off).")
@click.option("--min-p", type=float, default=0.0, help="Drop tokens less likely than min_p x the most likely one (0: off).")
@click.option("--repetition-penalty", type=float, default=1.0, help="Penalize tokens already seen (1: off), greedy too.")
@click.option("--seed", type=click.IntRange(0, None), default=None, help="Make sampling repeatable.")
@click.option("--stop", "stops", multiple=True, metavar="TEXT", help="End the answer at this text (not shown); repeat for more.")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="Execution provider, e.g. CUDAExecutionProvider (repeat for a fallback order). Default: the package's target.")
def run(package: Path, prompt: str, adapters: tuple[str, ...], loads: tuple[str, ...], max_new_tokens: int, raw: bool,
        do_sample: bool, temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
        seed: int | None, stops: tuple[str, ...], threads: int | None, providers: tuple[str, ...]) -> None:  # fmt: skip
    """Generate with PACKAGE, greedy, streaming tokens as they come.

    \b
    Examples:
      lora-edge run pkg/ --adapter pirate --prompt "What is the capital of Italy?"
      lora-edge run pkg/ --prompt "What is snow?"                       # no adapter: the base model
      lora-edge run pkg/ -a none -a pirate -a shout --prompt "What is snow?"   # side by side
      lora-edge run pkg/ -a pirate@0.5 -a pirate@0.7+shout@0.3 --prompt "What is snow?"   # strength, blend
      lora-edge run pkg/ --load mine=adapters/mine -a mine --prompt "Hi"   # a PEFT adapter, converted here
      lora-edge run pkg/ -a pirate --do-sample --temperature 0.8 --top-p 0.95 --seed 1 --prompt "Tell a story"
    """
    from ..config import AdapterSpec
    from ..runtime import EncoderModel, load
    from ..runtime.adapter_set import parse_choice

    model = load(package, threads=threads, providers=list(providers) or None)
    for spec in map(AdapterSpec.parse, loads):
        model.load_adapter(spec.name, spec.path)
    labels = list(adapters) or ["none"]
    choices = [parse_choice(a) for a in labels]
    for a in choices:  # unknown names and bad weights fail before any generation
        model.check_adapter(a)
    if isinstance(model, EncoderModel):  # classify (label probabilities) or embed (the sentence vector)
        width = max(map(len, labels))
        for label, a in zip(labels, choices):
            if model.num_labels:
                probs = model.classify([prompt], a)[0]
                shown = "  ".join(f"label {i}: {p:.3f}" for i, p in enumerate(probs))
            else:
                vec = model.embed([prompt], a)[0]
                shown = f"embedding ({vec.size}): " + " ".join(f"{v:+.3f}" for v in vec[:8]) + " ..."
            click.echo(f"{label:>{width}} | {shown}")
        return
    options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=stops)  # fmt: skip
    if len(choices) == 1:
        for piece in model.stream(prompt, adapter=choices[0], max_new_tokens=max_new_tokens, chat=not raw, **options):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    width = max(map(len, labels))
    for label, a in zip(labels, choices):
        text = model.generate(prompt, adapter=a, max_new_tokens=max_new_tokens, chat=not raw, **options)
        click.echo(f"{label:>{width}} | {' '.join(text.split())}")
