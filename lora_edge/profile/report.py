"""The profile's result as plain data: what :func:`lora_edge.profile.profile` returns, and its JSON and CSV forms.

The JSON shape is pinned by tests/golden/profile_schema.json: a change of shape bumps :data:`SCHEMA`."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field

SCHEMA = "lora-edge-profile/3"


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, xs: list[float]) -> "Spread":
        s = sorted(xs)
        n = len(s)
        med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        return cls(median=med, min=s[0], max=s[-1])


@dataclass
class Percentiles:
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, xs: list[float]) -> "Percentiles":
        s = sorted(xs)

        def pct(q: float) -> float:  # nearest-rank
            return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]

        return cls(p50=pct(50), p95=pct(95), p99=pct(99))


@dataclass
class RunFigures:
    """One package x adapter x thread count x prompt length."""

    package: str
    adapter: str  # "none" = the base model; for a merged package, the merged adapter's name
    merged: bool
    rank: int | None
    threads: int
    prompt_tokens: int
    new_tokens: int
    batch: int
    runs: int
    ttft_ms: Spread
    prefill_tps: Spread
    decode_tps: Spread
    token_ms: Percentiles
    switch_us: float  # switching to this adapter between calls (median; a thread's pooled binding)
    first_bind_us: float  # binding its tensors the first time on a thread (median)
    provider: str  # the execution provider that ran it

    @classmethod
    def from_json(cls, r: dict) -> "RunFigures":
        return cls(**{**r, "ttft_ms": Spread(**r["ttft_ms"]), "prefill_tps": Spread(**r["prefill_tps"]),
                      "decode_tps": Spread(**r["decode_tps"]), "token_ms": Percentiles(**r["token_ms"])})  # fmt: skip


@dataclass
class MemoryFigures:
    """One package x thread count: one child process."""

    package: str
    threads: int
    load_s: float
    baseline_mib: float  # Python + onnxruntime, before loading
    loaded_mib: float  # after loading the package and its adapters
    peak_mib: float  # high-water mark over the whole run
    weights_mib: float  # loaded - baseline - adapters: the session's weights and buffers
    adapters_mib: float  # the loaded adapter tensors
    per_adapter_mib: float  # adapters_mib per loaded adapter
    # resident after the runs, by kind (sandbox.resident_parts): the package's mapped files, the heap, other mapped files
    mapped_mib: float
    anonymous_mib: float
    libraries_mib: float
    kv_cache_mib: float  # at the longest prompt + new tokens
    tokenizer_mib: float  # tokenizer.json parsed, and jinja2 for the chat template
    package_mib: float  # on disk
    limit_mib: int | None
    limit_method: str | None  # cgroup-v2 | cgroup-v1 | rss-watchdog


@dataclass
class OpShare:
    """Where decode time goes, from ONNX Runtime's profiler."""

    package: str
    adapter: str
    threads: int
    # share of decode operator time spent in the LoRA branch nodes; None where the branches run inside the
    # int4 projections' own nodes (named lora+base/...), whose time the profiler cannot split
    lora_pct: float | None
    by_op: dict[str, float]  # operator type -> share of decode operator time (%)


@dataclass
class SweepPoint:
    package: str
    kind: str  # "rank" | "adapters"
    value: int
    threads: int
    decode_tps: float | None = None  # rank sweep
    branch_cost_pct: float | None = None  # rank sweep: decode time vs no adapter
    rss_mib: float | None = None  # adapter sweep: resident memory with `value` adapters loaded
    adapter_file_mib: float | None = None  # adapter sweep: size of each loaded adapter on disk


@dataclass
class DoesNotFit:
    package: str
    threads: int
    limit_mib: int
    limit_method: str
    needs_mib: float | None  # the peak measured without the limit

    @property
    def message(self) -> str:
        need = f"needs at least {math.ceil(self.needs_mib)} MiB" if self.needs_mib else "its need could not be measured"
        return f"{self.package} does not fit in {self.limit_mib} MiB at {self.threads} thread(s): {need} (limit enforced by {self.limit_method})"


@dataclass
class PackageFacts:
    label: str
    path: str
    quant: str
    mode: str
    attention: str
    package_mib: float
    adapter_file_mib: dict[str, float]


@dataclass
class ProfileReport:
    schema: str
    machine: dict
    workload: dict
    limits: dict
    packages: list[PackageFacts]
    runs: list[RunFigures]
    memory: list[MemoryFigures]
    ops: list[OpShare]
    sweeps: list[SweepPoint]
    does_not_fit: list[DoesNotFit]
    comparison: list[dict] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.does_not_fit

    def to_json(self) -> dict:
        out = asdict(self)
        out["does_not_fit"] = [{**asdict(d), "message": d.message} for d in self.does_not_fit]
        return out

    def csv_text(self) -> str:
        """One row per package x adapter x threads x prompt length, with its process's memory and the machine."""
        mem = {(m.package, m.threads): m for m in self.memory}
        ops = {(o.package, o.adapter, o.threads): o for o in self.ops}
        rows = []
        for r in self.runs:
            row = {}
            for k, v in asdict(r).items():
                if isinstance(v, dict):
                    row.update({f"{k}_{kk}": vv for kk, vv in v.items()})
                else:
                    row[k] = v
            m = mem.get((r.package, r.threads))
            for k in ("load_s", "baseline_mib", "loaded_mib", "peak_mib", "weights_mib", "adapters_mib", "per_adapter_mib", "mapped_mib",
                      "anonymous_mib", "libraries_mib", "kv_cache_mib", "tokenizer_mib", "package_mib", "limit_mib"):
                row[k] = getattr(m, k) if m else None
            o = ops.get((r.package, r.adapter, r.threads))
            row["lora_pct"] = o.lora_pct if o else None
            for k in ("cpu", "logical_cpus", "memory_mib", "onnxruntime", "lora_edge"):
                row[f"machine_{k}"] = self.machine.get(k)
            rows.append(row)
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()


def compare(report: ProfileReport) -> list[dict]:
    """Each later package against the first, matched on adapter, threads and prompt length."""
    if len(report.packages) < 2:
        return []
    first = report.packages[0].label
    base = {(r.adapter, r.threads, r.prompt_tokens): r for r in report.runs if r.package == first}
    mem = {(m.package, m.threads): m for m in report.memory}
    out = []
    for r in report.runs:
        ref = base.get((r.adapter, r.threads, r.prompt_tokens))
        if r.package == first or ref is None:
            continue
        mr, mb = mem.get((r.package, r.threads)), mem.get((first, r.threads))
        out.append({"package": r.package, "versus": first, "adapter": r.adapter, "threads": r.threads, "prompt_tokens": r.prompt_tokens,
                    "decode_tps_ratio": r.decode_tps.median / ref.decode_tps.median,
                    "prefill_tps_ratio": r.prefill_tps.median / ref.prefill_tps.median,
                    "ttft_ratio": r.ttft_ms.median / ref.ttft_ms.median,
                    "peak_mib_ratio": (mr.peak_mib / mb.peak_mib) if mr and mb else None,
                    "package_mib_ratio": (mr.package_mib / mb.package_mib) if mr and mb else None})  # fmt: skip
    return out
