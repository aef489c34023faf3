"""The report as one PNG (``--plot``); matplotlib is an optional dependency, imported only here."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .report import ProfileReport


def plot(report: ProfileReport, path: Path) -> None:
    """A PNG with tokens/s per adapter and thread count, the memory breakdown, the per-token latency
    percentiles, and the sweeps (decode speed against context length or rank; memory against adapters)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'lora-edge[plot]'") from None
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    first_prompt = {(r.package, r.adapter, r.threads): r for r in reversed(report.runs)}
    keys = sorted({(r.package, r.adapter) for r in report.runs})
    threads = sorted({r.threads for r in report.runs})
    width = 0.8 / max(1, len(threads))
    for j, t in enumerate(threads):
        vals = [first_prompt[(p, a, t)].decode_tps.median if (p, a, t) in first_prompt else 0 for p, a in keys]
        errs = [[v - first_prompt[(p, a, t)].decode_tps.min if (p, a, t) in first_prompt else 0 for v, (p, a) in zip(vals, keys)],
                [first_prompt[(p, a, t)].decode_tps.max - v if (p, a, t) in first_prompt else 0 for v, (p, a) in zip(vals, keys)]]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, yerr=errs, label=f"{t} thread(s)")
    ax.set_xticks([i + width * (len(threads) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{p}\n{a}" for p, a in keys], fontsize=7, rotation=20)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed per adapter")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    labels = [f"{x.package}\n{x.threads} thr" for x in report.memory]
    bottom = [0.0] * len(report.memory)
    for part in ("baseline_mib", "weights_mib", "adapters_mib", "tokenizer_mib", "kv_cache_mib"):
        vals = [getattr(x, part) for x in report.memory]
        ax.bar(labels, vals, bottom=bottom, label=part.replace("_mib", "").replace("baseline", "runtime"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.bar(labels, [max(0.0, x.peak_mib - b) for x, b in zip(report.memory, bottom)], bottom=bottom, color="lightgray",
           label="activations, arena, other")  # fmt: skip
    ax.scatter(labels, [x.peak_mib for x in report.memory], color="black", marker="_", s=400, label="peak RSS", zorder=3)
    ax.set_ylabel("MiB")
    ax.set_title("Memory")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)

    ax = axes[1][0]
    rows = report.runs
    for q, style in (("p50", "o"), ("p95", "s"), ("p99", "^")):
        ax.plot(range(len(rows)), [getattr(r.token_ms, q) for r in rows], style, label=q)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.package}\n{r.adapter} {r.threads}t {r.prompt_tokens}" for r in rows], fontsize=6, rotation=60)
    ax.set_ylabel("ms per token")
    ax.set_title("Per-token decode latency")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    ranks = [p for p in report.sweeps if p.kind == "rank"]
    counts = [p for p in report.sweeps if p.kind == "adapters"]
    def lines(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> None:
        for label, pts in sorted(series.items()):
            ax.plot([x for x, _ in sorted(pts)], [y for _, y in sorted(pts)], "o-", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)

    def group(points, key, xy) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for p in points:
            out.setdefault(key(p), []).append(xy(p))
        return out

    if len(report.workload["prompt_tokens"]) > 1:
        lines(group(report.runs, lambda r: f"{r.package} {r.adapter} {r.threads}t", lambda r: (r.prompt_tokens, r.decode_tps.median)),
              "context (prompt tokens)", "decode tokens/s", "Decode speed vs context length")  # fmt: skip
    elif ranks:
        lines(group(ranks, lambda p: f"{p.package} {p.threads}t", lambda p: (p.value, p.decode_tps)),
              "LoRA rank (every slot)", "decode tokens/s", "Decode speed vs adapter rank")  # fmt: skip
    elif counts:
        lines(group(counts, lambda p: f"{p.package} {p.threads}t", lambda p: (p.value, p.rss_mib)),
              "adapters loaded", "resident MiB", "Memory vs loaded adapters")  # fmt: skip
    elif report.ops:
        ax.bar([f"{o.package}\n{o.adapter} {o.threads}t" for o in report.ops], [o.lora_pct or 0.0 for o in report.ops])
        ax.set_ylabel("% of decode operator time")
        ax.set_title("Time in the LoRA branches (ONNX Runtime profiler)")
        ax.tick_params(axis="x", labelsize=7)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no sweep (give several --prompt-tokens, --ranks or --adapter-counts)", ha="center", fontsize=9)
    fig.suptitle(f"lora-edge profile: {report.machine['cpu']}, onnxruntime {report.machine['onnxruntime']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
