"""The report as text: the tables `lora-edge profile` prints."""

from __future__ import annotations

import math

from .report import OpShare, ProfileReport, SweepPoint


def render(report: ProfileReport) -> str:
    lines = []
    m = report.machine
    lines.append(f"{m['cpu']}, {m['logical_cpus']} CPUs, {m['memory_mib']} MiB; onnxruntime {m['onnxruntime']}; "
                 f"prompt {'/'.join(map(str, report.workload['prompt_tokens']))} tokens, {report.workload['new_tokens']} new, "
                 f"batch {report.workload['batch']}, median of {report.workload['runs']} runs (min-max)")  # fmt: skip
    ops = {(o.package, o.adapter, o.threads): o for o in report.ops}
    used = sorted({r.provider for r in report.runs})
    if used:
        lines[-1] += f"; ran on {', '.join(used)}"
    if report.runs:
        lines += ["", _table(["package", "adapter", "rank", "thr", "prompt", "TTFT ms", "prefill tok/s", "decode tok/s",
                              "token ms p50/p95/p99", "switch µs (first)", "LoRA share"],
                             [[r.package, r.adapter + (" (merged)" if r.merged else ""), r.rank or "-", r.threads, r.prompt_tokens,
                               f"{_n(r.ttft_ms.median)} ({_n(r.ttft_ms.min)}-{_n(r.ttft_ms.max)})",
                               _n(r.prefill_tps.median),
                               f"{_n(r.decode_tps.median)} ({_n(r.decode_tps.min)}-{_n(r.decode_tps.max)})",
                               f"{_n(r.token_ms.p50)}/{_n(r.token_ms.p95)}/{_n(r.token_ms.p99)}",
                               f"{_n(r.switch_us)} ({_n(r.first_bind_us)})",
                               _share(ops.get((r.package, r.adapter, r.threads)))]
                              for r in report.runs])]  # fmt: skip
    if report.memory:
        lines += ["", _table(["package", "thr", "load s", "on disk MiB", "runtime MiB", "weights MiB", "adapters MiB", "tokenizer MiB",
                              "KV cache MiB", "peak RSS MiB", "limit"],
                             [[x.package, x.threads, f"{x.load_s:.2f}", f"{x.package_mib:.1f}", f"{x.baseline_mib:.0f}",
                               f"{x.weights_mib:.0f}", f"{x.adapters_mib:.1f}", f"{x.tokenizer_mib:.1f}", f"{x.kv_cache_mib:.1f}",
                               f"{x.peak_mib:.0f}",
                               f"{x.limit_mib} MiB ({x.limit_method})" if x.limit_mib else "-"] for x in report.memory])]  # fmt: skip
        lines += ["", "resident after the runs: mapped = the package's own files; heap = prepacked weights, adapters, KV cache, "
                  "tokenizer; libraries = Python, onnxruntime, numpy",
                  _table(["package", "thr", "peak RSS MiB", "mapped weights MiB", "heap MiB", "libraries MiB", "per adapter MiB"],
                         [[x.package, x.threads, f"{x.peak_mib:.0f}", f"{x.mapped_mib:.1f}", f"{x.anonymous_mib:.0f}",
                           f"{x.libraries_mib:.0f}", f"{x.per_adapter_mib:.1f}"] for x in report.memory])]  # fmt: skip
    if report.ops:
        lines.append("")
        for o in report.ops:
            top = ", ".join(f"{k} {v:.0f}%" for k, v in list(o.by_op.items())[:5])
            lines.append(f"where decode time goes: {o.package} / {o.adapter} / {o.threads} thr: LoRA {_share(o)}; {top}")
    ranks = [p for p in report.sweeps if p.kind == "rank"]
    if ranks:
        lines += ["", _table(["package", "thr", "rank", "decode tok/s", "cost vs no adapter"],
                             [[p.package, p.threads, p.value, f"{p.decode_tps:.1f}", f"{p.branch_cost_pct:+.1f}%"] for p in ranks])]
    counts = [p for p in report.sweeps if p.kind == "adapters"]
    if counts:
        rows = []
        for key in dict.fromkeys((p.package, p.threads) for p in counts):
            pts = [p for p in counts if (p.package, p.threads) == key]
            per = _slope([p.value for p in pts], [p.rss_mib for p in pts])
            rows.append([*key, ", ".join(str(p.value) for p in pts), " ".join(f"{p.rss_mib:.0f}" for p in pts),
                         f"{per:.1f}" if per is not None else "-", f"{pts[0].adapter_file_mib:.1f}", _saved(pts)])  # fmt: skip
        lines += ["", _table(["package", "thr", "adapters loaded", "RSS MiB", "MiB per adapter (fit)", "adapter file MiB",
                              "base + N vs N merged"], rows)]  # fmt: skip
    if report.comparison:
        lines += ["", _table(["package", "vs", "adapter", "thr", "prompt", "decode", "prefill", "TTFT", "peak RSS", "on disk"],
                             [[c["package"], c["versus"], c["adapter"], c["threads"], c["prompt_tokens"], f"{c['decode_tps_ratio']:.2f}x",
                               f"{c['prefill_tps_ratio']:.2f}x", f"{c['ttft_ratio']:.2f}x",
                               f"{c['peak_mib_ratio']:.2f}x" if c["peak_mib_ratio"] else "-",
                               f"{c['package_mib_ratio']:.2f}x" if c["package_mib_ratio"] else "-"] for c in report.comparison])]  # fmt: skip
    for d in report.does_not_fit:
        lines += ["", d.message]
    return "\n".join(lines)


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope (memory per loaded adapter); None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _saved(pts: list[SweepPoint]) -> str:
    """One process holding the base and the most adapters swept, against as many processes each holding one merged model
    (a merged package weighs what the base does: the same weights, no branch inputs)."""
    base = next((p.rss_mib for p in pts if p.value == 0), None)
    top = max(pts, key=lambda p: p.value)
    if base is None or top.value < 2:
        return "-"
    merged = top.value * base
    return f"{top.rss_mib:.0f} vs {merged:.0f} MiB (-{100 * (1 - top.rss_mib / merged):.0f}%)"


def _share(o: OpShare | None) -> str:
    """The LoRA share column: a percentage, "in base" (the branch runs inside the int4 projection's node, so the
    profiler cannot tell its time apart), or "-" when not profiled."""
    if o is None:
        return "-"
    return "in base" if o.lora_pct is None else f"{o.lora_pct:.1f}%"


def _n(x: float) -> str:
    """Three significant digits, no exponent for the sizes we show (0.0123, 1.23, 123, 12345)."""
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])
