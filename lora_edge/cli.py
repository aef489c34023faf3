"""The `lora-edge` command: options -> typed config -> one library call -> render.

Only this module prints. A LoraEdgeError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .config import AdapterSpec, Attention, LoraDtype, LoraKernel, Mode, QuantAlgo, Target, WeightType, ZeroPoint
from .errors import LoraEdgeError
from .recipes import DEFAULT as DEFAULT_RECIPE
from .recipes import Recipe, describe_recipes, export_config


class UserError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoraEdgeError as exc:
            raise UserError(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-edge")
def cli() -> None:
    """Compile a base model + PEFT LoRA adapters into an ONNX package, and run it on device.

    \b
      lora-edge export BASE --adapter pirate=adapters/pirate -o pkg/
      lora-edge inspect pkg/
      lora-edge run pkg/ --adapter pirate --prompt "What is the capital of Italy?"
    """


def _progress(start: float):
    def report(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    return report


def _choice(kind) -> click.Choice:
    return click.Choice(kind.values())


@cli.command(epilog="\b\nRecipes (--recipe; any flag below overrides the recipe's value):\n" + describe_recipes())
@click.argument("base", type=click.Path(path_type=Path))
@click.option("-a", "--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter directory; repeat for more. NAME becomes adapters/NAME.onnx_adapter.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Package directory to create.")
@click.option("-r", "--recipe", type=_choice(Recipe), default=DEFAULT_RECIPE.value, show_default=True,
              help="The measured best options for an intent (listed below); the flags after --force override it.")
@click.option("--mode", type=_choice(Mode), default=Mode.BRANCH.value, show_default=True,
              help="branch: adapters stay switchable per call on one graph. merge: fold exactly one adapter into the weights "
                   "(several adapters with merge is an error: export once per adapter). Merging before int4 can cost accuracy: "
                   "check with `lora-edge verify`.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an existing lora-edge package (nothing else is ever deleted).")
@click.option("-q", "--quant", type=_choice(WeightType), default=None,
              help="Base weights: fp32, fp16 (stored half, computed fp32), int8 or int4 (block-wise MatMulNBits). LoRA stays float.")
@click.option("--target", type=_choice(Target), default=None,
              help="cpu: model.onnx, float32 compute. mobile: model.ort (ORT format) + the operator config for a reduced "
                   "ORT build. cuda: float16 compute and LoRA tensors.")
@click.option("--lora-kernel", type=_choice(LoraKernel), default=None,
              help="onnx: LoRA branches as standard MatMuls (any onnxruntime). native: lora-edge's own operators (threaded; "
                   "at int4 they run the projections too; --target cpu); the device needs `lora-edge build-kernel`.")
@click.option("--lora-dtype", type=_choice(LoraDtype), default=None,
              help="With --lora-kernel native: how A/B are stored. float16; int8: one scale per rank, half the bytes "
                   "(~0.7% relative error in the branch's output); w8a8: int8 laid out for integer dot products, the "
                   "branch's activations in int8 too (the fastest branch; ~1% relative error in the branch's output).")
@click.option("--block-size", type=int, default=None, help="Quantization block size (16-256, power of two); default 16 for int8, 32 for int4.")
@click.option("--zero", type=_choice(ZeroPoint), default=None,
              help="Block zero points: int (uint8), none (symmetric) or float (fp16 offsets, run as a small correction). "
                   "Default: float for int4, int for int8.")
@click.option("--quant-algo", type=_choice(QuantAlgo), default=None,
              help="gptq (default): error-compensating, calibrated on a text; search: per-block clipping search; rtn: round-to-nearest.")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Calibration text for GPTQ (default: a mixed-genre text shipped with lora-edge).")
@click.option("--embeddings", type=_choice(WeightType), default=None,
              help="Embedding (and tied lm_head) precision; default int8 when --quant is int8/int4.")
@click.option("--int8-modules", multiple=True, metavar="PATTERN", help="With --quant int4: modules kept at 8 bits (e.g. down_proj).")
@click.option("--float-modules", multiple=True, metavar="PATTERN", help="Modules left in float32.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits compute: 4 = int8 activations (default; fastest on CPU), 0 = float32.")
@click.option("--attention", type=_choice(Attention), default=Attention.FUSED.value, show_default=True,
              help="fused: ONNX Runtime's fused operators (fast; unpadded batches). reference: standard ONNX ops only.")
@click.option("--null-rank", type=click.IntRange(0, 1), default=None,
              help="Rank of the 'no adapter' defaults: 0 (empty: no branch work; default for cpu/mobile) or 1 (zeros, "
                   "works on every provider; default for cuda).")
def export(base: Path, adapters: tuple[str, ...], output: Path, recipe: str, mode: str, force: bool, **flags) -> None:
    """Compile BASE (a Hugging Face model directory or a .gguf file) and adapters into a package.

    \b
    Examples:
      lora-edge export ./SmolLM2-135M-Instruct -a pirate=adapters/pirate -a shout=adapters/shout -o pkg/
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-fast/ --recipe fastest
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-phone/ --recipe mobile
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-merged/ --mode merge --recipe portable
      lora-edge export model.gguf -a pirate=adapters/pirate -o pkg-int8/ --recipe portable --quant int8
    """
    from .compile.pipeline import export as do_export

    start = time.perf_counter()
    cfg = _export_config(base, adapters, output, recipe, mode, force, flags)
    result = do_export(cfg, progress=_progress(start))
    m = result.manifest
    click.echo(f"wrote {result.path} ({m.size() / 2**20:.1f} MiB, {len(m.adapters)} adapter(s), recipe {m.recipe}) "
               f"in {time.perf_counter() - start:.1f}s")  # fmt: skip


_QUANT_FLAGS = {"quant": "weights", "block_size": "block_size", "zero": "zero", "quant_algo": "algo", "calibration": "calibration",
                "embeddings": "embeddings", "accuracy_level": "accuracy_level"}  # fmt: skip


def _export_config(base, adapters, output, recipe, mode, force, flags):
    """The recipe's options with every flag the user gave in their place."""
    quant = {field: flags[flag] for flag, field in _QUANT_FLAGS.items() if flags[flag] is not None}
    quant.update({k: tuple(flags[k]) for k in ("int8_modules", "float_modules") if flags[k]})
    options = {k: flags[k] for k in ("target", "lora_kernel", "lora_dtype", "null_rank") if flags[k] is not None}
    return export_config(recipe, quant=quant, base=base, output=output, adapters=tuple(AdapterSpec.parse(a) for a in adapters),
                         mode=Mode(mode), force=force, attention=Attention(flags["attention"]), **options)  # fmt: skip


@cli.command("build-kernel")
@click.option("--ort-include", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="ONNX Runtime's include folder (holding onnxruntime_cxx_api.h, any release >= 1.21). Default: "
                   "$LORA_EDGE_ORT_INCLUDE, the cache, /usr/include/onnxruntime, else fetched from Debian's libonnxruntime-dev.")
@click.option("--cxx", default=None, help="C++ compiler (default: $CXX, c++, g++ or clang++).")
@click.option("--march", default="native", show_default=True, help="CPU to compile for (-march=...).")
@click.option("--no-fetch", is_flag=True, help="Never download headers; fail if none are found.")
@click.option("--force", is_flag=True, help="Rebuild even if this source is already built.")
def build_kernel(ort_include: Path | None, cxx: str | None, march: str, no_fetch: bool, force: bool) -> None:
    """Build lora-edge's native LoRA kernel for this machine (for packages exported with --lora-kernel native).

    It goes to $LORA_EDGE_CACHE (default ~/.cache/lora-edge)/kernels; the runtime finds it there, or at
    $LORA_EDGE_KERNEL_LIB.

    \b
    Examples:
      lora-edge build-kernel
      lora-edge build-kernel --ort-include ~/onnxruntime-linux-x64-1.22.0/include
    """
    from .native.build import build

    start = time.perf_counter()
    path = build(ort_include=ort_include, cxx=cxx, march=march, force=force, fetch=not no_fetch, progress=_progress(start))
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
    from .package.inspect import describe, describe_json, render

    info = describe(package)
    click.echo(json.dumps(describe_json(info), indent=2, sort_keys=True) if as_json else render(info))


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The user's message (the chat template is applied if the model has one).")
@click.option("-a", "--adapter", "adapters", multiple=True,
              help="Adapter to use; 'none' for the base. Repeat to compare answers side by side.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(1, None), default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="Execution provider, e.g. CUDAExecutionProvider (repeat for a fallback order). Default: the package's target.")
def run(package: Path, prompt: str, adapters: tuple[str, ...], max_new_tokens: int, raw: bool, threads: int | None,
        providers: tuple[str, ...]) -> None:  # fmt: skip
    """Generate with PACKAGE, greedy, streaming tokens as they come.

    \b
    Examples:
      lora-edge run pkg/ --adapter pirate --prompt "What is the capital of Italy?"
      lora-edge run pkg/ --prompt "What is snow?"                       # no adapter: the base model
      lora-edge run pkg/ -a none -a pirate -a shout --prompt "What is snow?"   # side by side
    """
    from .runtime import EncoderModel, load

    model = load(package, threads=threads, providers=list(providers) or None)
    choices = [None if a.lower() == "none" else a for a in adapters] or [None]
    for a in choices:  # unknown names fail before any generation
        model.check_adapter(a)
    if isinstance(model, EncoderModel):  # classify (label probabilities) or embed (the sentence vector)
        width = max(len(a or "none") for a in choices)
        for a in choices:
            if model.num_labels:
                probs = model.classify([prompt], a)[0]
                shown = "  ".join(f"label {i}: {p:.3f}" for i, p in enumerate(probs))
            else:
                vec = model.embed([prompt], a)[0]
                shown = f"embedding ({vec.size}): " + " ".join(f"{v:+.3f}" for v in vec[:8]) + " ..."
            click.echo(f"{(a or 'none'):>{width}} | {shown}")
        return
    if len(choices) == 1:
        for piece in model.stream(prompt, adapter=choices[0], max_new_tokens=max_new_tokens, chat=not raw):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    width = max(len(a or "none") for a in choices)
    for a in choices:
        text = model.generate(prompt, adapter=a, max_new_tokens=max_new_tokens, chat=not raw)
        click.echo(f"{(a or 'none'):>{width}} | {' '.join(text.split())}")


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
def verify(package, reference, adapters, text, max_tokens, greedy_tokens, prompt, max_ppl_increase, min_top1, providers, as_json) -> None:
    """Compare PACKAGE with the PyTorch + PEFT original: logits, KL, top-1, perplexity, adapter effect, greedy tokens.

    \b
    Examples:
      lora-edge verify pkg/
      lora-edge verify pkg-int4/ --adapter pirate --text my_corpus.txt --json
      lora-edge verify pkg-int8/ --max-ppl-increase 1 --min-top1 98      # exit 1 if not met
    """
    from .compile.verify import VerifyConfig, render
    from .compile.verify import verify as do_verify

    names, paths = [], {}
    for a in adapters:
        name, sep, path = a.partition("=")
        names.append(name)
        if sep:
            paths[name] = Path(path)
    cfg = VerifyConfig(package=package, reference=reference, adapters=tuple(names), adapter_paths=paths, text=text,
                       max_tokens=max_tokens, greedy_tokens=greedy_tokens, prompt=prompt,
                       max_ppl_increase=max_ppl_increase, min_top1=min_top1, providers=providers)  # fmt: skip
    report = do_verify(cfg, progress=_progress(time.perf_counter()))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render(report))
    if not report.passed:
        sys.exit(1)


def _ints(text: str | None, what: str) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        vals = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{what} must be integers separated by commas, got {text!r}") from None
    if not vals:
        raise click.BadParameter(f"{what} is empty")
    return vals


@cli.command()
@click.argument("packages", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-a", "--adapter", "adapters", multiple=True, help="Adapter to measure ('none' = base); repeat. Default: none + every adapter.")
@click.option("--prompt-tokens", default="128", show_default=True, help="Prompt length; a list (64,256,1024) sweeps context length.")
@click.option("-n", "--new-tokens", type=click.IntRange(2, None), default=64, show_default=True, help="Tokens generated per run (forced).")
@click.option("--batch", type=click.IntRange(1, None), default=1, show_default=True, help="Sequences decoded together.")
@click.option("--warmup", type=click.IntRange(0, None), default=1, show_default=True, help="Unmeasured runs first.")
@click.option("--runs", type=click.IntRange(1, None), default=3, show_default=True, help="Measured runs (median and min-max reported).")
@click.option("-t", "--threads", default=None, help="ONNX Runtime threads; a list (1,2,4) sweeps. Default 1, or the preset's.")
@click.option("--affinity", default=None, metavar="CPUS", help="Pin the measuring process to these CPU ids (e.g. 0,1).")
@click.option("--memory-limit", type=click.IntRange(16, None), default=None, metavar="MIB",
              help="Enforce a memory limit (cgroup when allowed, else an RSS watchdog); reports what it needs if it does not fit.")
@click.option("--provider", default=None, help="Execution provider (default: the preset's, else the package's target).")
@click.option("--preset", default=None, help="A device preset: threads + memory + provider (see --list-presets).")
@click.option("--presets", "presets_file", type=click.Path(path_type=Path), default=None, help="A TOML file of more presets.")
@click.option("--list-presets", is_flag=True, help="List the presets and exit.")
@click.option("--ranks", default=None, help="Rank sweep: synthetic adapters of these ranks on every slot (branch packages).")
@click.option("--adapter-counts", default=None, help="Memory sweep: RSS with this many adapters loaded (e.g. 0,1,2,4,8).")
@click.option("--no-op-profile", is_flag=True, help="Skip ONNX Runtime's per-operator profile (the LoRA share column).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write every figure as JSON ('-' = stdout).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the figures as CSV ('-' = stdout).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write a PNG of the figures (needs matplotlib).")
def profile(packages, adapters, prompt_tokens, new_tokens, batch, warmup, runs, threads, affinity, memory_limit, provider, preset,
            presets_file, list_presets, ranks, adapter_counts, no_op_profile, json_path, csv_path, plot_path) -> None:  # fmt: skip
    """Measure PACKAGES on this machine: load time, time to first token, prefill and decode tokens/s,
    per-token latency percentiles, peak memory, adapter switch time and the LoRA share of decode time;
    per adapter, under a thread count, CPU affinity and memory limit. Two packages: side by side with ratios.

    \b
    Examples:
      lora-edge profile pkg/                                   # none + every adapter, 1 thread
      lora-edge profile pkg/ -a pirate --threads 1,2 --prompt-tokens 64,256,1024
      lora-edge profile pkg/ --preset raspberry-pi-4 --json out.json --csv out.csv --plot out.png
      lora-edge profile pkg/ --memory-limit 300                # exit 1 and "needs at least N MiB" if it does not fit
      lora-edge profile pkg-merged/ pkg-branch/                # merged vs branch, ratios
      lora-edge profile pkg/ --ranks 4,16,64 --adapter-counts 0,1,2,4
    """
    from .errors import InputError
    from .profile import Limits, ProfileConfig, Workload, limits_from_preset, load_presets, plot, render
    from .profile import profile as do_profile

    presets = load_presets(presets_file)
    if list_presets:
        for name, p in sorted(presets.items()):
            click.echo(f"{name:16} threads={p.get('threads', 1)} memory_mib={p.get('memory_mib', '-')} "
                       f"provider={p.get('provider', 'default')}  {p.get('description', '')}")  # fmt: skip
        return
    for out in (json_path, csv_path, plot_path):
        if out is not None and str(out) != "-" and not out.parent.exists():
            raise InputError(f"the directory of {out} does not exist; create it first")
    lim = limits_from_preset(preset, presets) if preset else Limits()
    lim = Limits(threads=_ints(threads, "--threads") or lim.threads, affinity=_ints(affinity, "--affinity") or lim.affinity,
                 memory_mib=memory_limit or lim.memory_mib, provider=provider or lim.provider)  # fmt: skip
    if max(lim.threads) > (os.cpu_count() or 1):
        click.echo(f"note: {max(lim.threads)} threads on a machine with {os.cpu_count()} CPUs; figures will show oversubscription", err=True)
    cfg = ProfileConfig(packages=tuple(packages), adapters=tuple(adapters) or None,
                        workload=Workload(prompt_tokens=_ints(prompt_tokens, "--prompt-tokens"), new_tokens=new_tokens, batch=batch,
                                          warmup=warmup, runs=runs),
                        limits=lim, op_profile=not no_op_profile, ranks=_ints(ranks, "--ranks"),
                        adapter_counts=_ints(adapter_counts, "--adapter-counts"))  # fmt: skip
    with click.progressbar(length=1, label="profiling", file=sys.stderr, show_pos=True) as bar:
        def progress(done: int, total: int, what: str) -> None:
            bar.length = total
            bar.label = f"profiling {what[:40]:40}"
            bar.update(done - bar.pos)

        report = do_profile(cfg, progress=progress)
    data = report.to_json()
    for path, text in ((json_path, lambda: json.dumps(data, indent=2)), (csv_path, report.csv_text)):
        if path is None:
            continue
        if str(path) == "-":
            click.echo(text())
        else:
            tmp = path.with_name(f".{path.name}.partial")
            tmp.write_text(text())
            os.replace(tmp, path)
    if plot_path is not None:
        plot(report, plot_path)
    if "-" not in (str(json_path), str(csv_path)):
        click.echo(render(report))
    elif not report.fits:
        for d in report.does_not_fit:
            click.echo(d.message, err=True)
    if not report.fits:
        sys.exit(1)


def main() -> None:
    try:
        cli.main(prog_name="lora-edge")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
