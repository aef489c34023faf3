"""`profile`: latency and memory of packages on this machine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .app import cli


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
    from ..errors import InputError
    from ..profile import Limits, ProfileConfig, Workload, limits_from_preset, load_presets, plot, render
    from ..profile import profile as do_profile

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
