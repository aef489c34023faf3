"""`lora-edge profile`: latency and memory of a package, per adapter, under the limits of a device.

Every measurement runs in a child process (``python -m lora_edge.profile``), so that peak memory
is that process's own high-water mark, CPU affinity and thread count apply to nothing else, and a
memory limit can be enforced on it alone:

- **memory limit**: the child is placed in its own cgroup (v2 ``memory.max`` or v1
  ``memory.limit_in_bytes``, swap off) when the system lets us create one; the kernel then kills
  it when it needs more. Otherwise the parent polls the child's resident memory every few
  milliseconds and kills it past the limit (best effort: a spike shorter than the poll can pass).
  A package that does not fit is re-measured without the limit to say how much it needs.
- **timing**: prefill is the first graph call on the prompt (time to first token includes
  binding the adapter and allocating the KV cache); decode is every later call, one token each,
  forced to the full length. Each configuration runs ``warmup`` times unmeasured, then ``runs``
  times; the report gives the median and the spread (min, max) over runs, and per-token latency
  percentiles over all measured decode steps.
- **where time goes**: a separate child runs ONNX Runtime's profiler and splits decode time
  between the LoRA branches (nodes named ``lora/...`` in the graph) and the base, per operator.

The library call :func:`profile` returns a :class:`ProfileReport` (plain data); the CLI renders it.
Device side: no torch, no transformers, no onnx.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import InputError, PackageError, RuntimeInputError

SCHEMA = "lora-edge-profile/1"
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Workload:
    prompt_tokens: tuple[int, ...] = (128,)  # several: a context-length sweep
    new_tokens: int = 64
    batch: int = 1
    warmup: int = 1
    runs: int = 3

    def __post_init__(self) -> None:
        if not self.prompt_tokens or any(not isinstance(n, int) or n < 1 for n in self.prompt_tokens):
            raise InputError(f"prompt lengths must be positive integers, got {self.prompt_tokens}")
        if self.new_tokens < 2:
            raise InputError(f"new tokens must be at least 2 (one prefill, one decode step), got {self.new_tokens}")
        if self.batch < 1 or self.warmup < 0 or self.runs < 1:
            raise InputError("batch and runs must be >= 1 and warmup >= 0")


@dataclass(frozen=True)
class Limits:
    threads: tuple[int, ...] = (1,)  # several: a thread sweep
    affinity: tuple[int, ...] | None = None  # CPU ids the child may run on
    memory_mib: int | None = None
    provider: str | None = None  # None: the package's target decides (cuda packages: CUDA when installed)

    def __post_init__(self) -> None:
        if not self.threads or any(not isinstance(t, int) or t < 1 for t in self.threads):
            raise InputError(f"threads must be positive integers, got {self.threads}")
        if self.memory_mib is not None and self.memory_mib < 16:
            raise InputError(f"a memory limit of {self.memory_mib} MiB is too small to start Python; give at least 16")
        if self.affinity is not None:
            allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
            bad = sorted(set(self.affinity) - allowed)
            if not self.affinity or bad:
                raise InputError(f"CPU affinity {list(self.affinity)} names CPUs this process may not use ({bad}); allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class ProfileConfig:
    packages: tuple[Path, ...]
    adapters: tuple[str, ...] | None = None  # None: the base ("none") and every adapter of each package
    workload: Workload = Workload()
    limits: Limits = Limits()
    op_profile: bool = True
    ranks: tuple[int, ...] = ()  # rank sweep: synthetic adapters of these ranks on every LoRA slot
    adapter_counts: tuple[int, ...] = ()  # memory sweep: this many adapters loaded at once

    def __post_init__(self) -> None:
        if not self.packages:
            raise InputError("give at least one package to profile")
        if any(r < 1 for r in self.ranks) or any(c < 0 for c in self.adapter_counts):
            raise InputError("ranks must be >= 1 and adapter counts >= 0")


# ---------------------------------------------------------------------------------------------
# report


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
    kv_cache_mib: float  # at the longest prompt + new tokens
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
    # int4 projections' own nodes (kernel v4, nodes named lora+base/...), whose time the profiler cannot split
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
            for k in ("load_s", "baseline_mib", "loaded_mib", "peak_mib", "weights_mib", "adapters_mib", "kv_cache_mib", "package_mib", "limit_mib"):
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


# ---------------------------------------------------------------------------------------------
# presets


def load_presets(extra: Path | None = None) -> dict[str, dict]:
    """Built-in presets, then ~/.config/lora-edge/presets.toml, $LORA_EDGE_PRESETS and ``extra`` (later wins)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    files = [Path(__file__).parent / "data" / "presets.toml", Path.home() / ".config" / "lora-edge" / "presets.toml"]
    if os.environ.get("LORA_EDGE_PRESETS"):
        files.append(Path(os.environ["LORA_EDGE_PRESETS"]))
    if extra is not None:
        if not extra.is_file():
            raise InputError(f"presets file {extra} does not exist")
        files.append(extra)
    presets: dict[str, dict] = {}
    for f in files:
        if not f.is_file():
            continue
        try:
            data = tomllib.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise InputError(f"presets file {f} is not valid TOML: {exc}") from None
        for name, p in data.get("presets", {}).items():
            unknown = set(p) - {"threads", "memory_mib", "provider", "affinity", "description"}
            if unknown:
                raise InputError(f"preset {name!r} in {f} has unknown keys {sorted(unknown)}; allowed: threads, memory_mib, provider, affinity, description")
            presets[name] = {**p, "source": str(f)}
    return presets


def limits_from_preset(name: str, presets: dict[str, dict]) -> Limits:
    if name not in presets:
        raise InputError(f"unknown preset {name!r}; known: {', '.join(sorted(presets)) or 'none'}")
    p = presets[name]
    threads = p.get("threads", 1)
    return Limits(threads=tuple(threads) if isinstance(threads, list) else (threads,), memory_mib=p.get("memory_mib"),
                  provider=p.get("provider"), affinity=tuple(p["affinity"]) if p.get("affinity") else None)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# machine facts


def machine_info() -> dict:
    import onnxruntime as ort

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_mib": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "lora_edge": __version__,
        "memory_limit_method": _limit_method(),
    }


# ---------------------------------------------------------------------------------------------
# memory limits


def _cgroup_dir() -> tuple[str, Path] | None:
    """A directory under which we may create a memory cgroup: ("cgroup-v2"|"cgroup-v1", path)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if hid == "0":  # v2
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                base = root / path.lstrip("/")
                try:
                    if "memory" in (base / "cgroup.subtree_control").read_text().split() and os.access(base, os.W_OK):
                        return "cgroup-v2", base
                except OSError:
                    continue
        elif "memory" in ctrls.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                return "cgroup-v1", base
    return None


def _limit_method() -> str:
    return _cgroup_dir()[0] if _cgroup_dir() else "rss-watchdog"


class _MemoryCage:
    """A memory limit for one child process: a fresh cgroup when possible, else an RSS watchdog."""

    def __init__(self, limit_mib: int | None) -> None:
        self.limit = limit_mib * MiB if limit_mib else None
        self.method: str | None = None
        self.path: Path | None = None
        self.tripped = False
        if self.limit is None:
            return
        found = _cgroup_dir()
        if found:
            kind, base = found
            path = base / f"lora-edge-profile-{os.getpid()}-{time.monotonic_ns()}"
            try:
                path.mkdir()
                if kind == "cgroup-v2":
                    (path / "memory.max").write_text(str(self.limit))
                    if (path / "memory.swap.max").exists():
                        (path / "memory.swap.max").write_text("0")
                else:
                    (path / "memory.limit_in_bytes").write_text(str(self.limit))
                    if (path / "memory.memsw.limit_in_bytes").exists():
                        (path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
                    if (path / "memory.swappiness").exists():
                        (path / "memory.swappiness").write_text("0")
                self.method, self.path = kind, path
                return
            except OSError:
                with _suppress():
                    path.rmdir()
        self.method = "rss-watchdog"

    def preexec(self) -> None:  # runs in the child before exec
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def watch(self, proc: subprocess.Popen) -> None:
        if self.method != "rss-watchdog":
            return
        while proc.poll() is None:
            if _rss_of(proc.pid) > self.limit:
                self.tripped = True
                proc.kill()
                return
            time.sleep(0.002)

    def killed_by_limit(self, returncode: int) -> bool:
        if self.limit is None:
            return False
        if self.tripped:
            return True
        if returncode != -signal.SIGKILL or self.path is None:
            return False
        for f in ("memory.events", "memory.oom_control"):  # v2, v1: "oom_kill N"
            with _suppress():
                for line in (self.path / f).read_text().splitlines():
                    key, value = line.split()
                    if key == "oom_kill" and int(value) > 0:
                        return True
        return False

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):  # the kernel frees the cgroup a moment after its last process exits
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.02)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, ValueError, IndexError))


def _rss_of(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _hwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):  # (ru_maxrss survives exec; VmHWM does not)
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------------------------------
# the parent: plan the children, run them, collect


Progress = Callable[[int, int, str], None]  # (done, total, what)


def profile(cfg: ProfileConfig, progress: Progress | None = None) -> ProfileReport:
    from .package import read_manifest

    progress = progress or (lambda done, total, what: None)
    labels = _labels(cfg.packages)
    facts, plans = [], []
    for label, pkg in zip(labels, cfg.packages):
        manifest = read_manifest(pkg, verify=True)
        if manifest.get("base", {}).get("spec", {}).get("kind", "decoder") == "encoder":
            raise InputError(f"{pkg} is an encoder package; `profile` measures generation (time to first token, decode tokens/s)")
        adapters = _choose_adapters(pkg, manifest, cfg.adapters)
        files = manifest.get("files", {})
        ad_files = {n: files.get(i["file"], {}).get("bytes", 0) / MiB for n, i in manifest.get("adapters", {}).items() if i.get("file")}
        facts.append(PackageFacts(label=label, path=str(pkg), quant=manifest.get("quantization", {}).get("weights", "fp32"),
                                  mode=manifest.get("mode", "branch"), attention=manifest.get("graph", {}).get("attention", "?"),
                                  package_mib=sum(f.get("bytes", 0) for f in files.values()) / MiB, adapter_file_mib=ad_files))  # fmt: skip
        merged = [n for n, i in manifest.get("adapters", {}).items() if i.get("merged")]
        if (cfg.ranks or cfg.adapter_counts) and not manifest.get("slots"):
            raise InputError(f"{pkg} has no LoRA slots (a merged package); rank and adapter-count sweeps need a branch package")
        plans.append((label, pkg, adapters, merged[0] if merged else None, manifest))

    w, lim = cfg.workload, cfg.limits
    def per_block(ads) -> int:  # progress steps of one package x thread count
        return len(ads) * len(w.prompt_tokens) * (w.warmup + w.runs) + (len(ads) if cfg.op_profile else 0) + len(cfg.ranks) + len(cfg.adapter_counts)

    total = sum(len(lim.threads) * per_block(a) for _, _, a, _, _ in plans)
    done = [0]

    def tick(what: str) -> None:
        done[0] += 1
        progress(min(done[0], total), total, what)

    report = ProfileReport(schema=SCHEMA, machine=machine_info(), workload=asdict(w), limits=asdict(lim), packages=facts,
                           runs=[], memory=[], ops=[], sweeps=[], does_not_fit=[])  # fmt: skip
    report.limits["memory_limit_method"] = None  # set by the first limited run: cgroup-v2, cgroup-v1 or rss-watchdog
    for label, pkg, adapters, merged, manifest in plans:
        for threads in lim.threads:
            job = {"kind": "measure", "package": str(pkg), "label": label, "threads": threads, "adapters": adapters,
                   "merged": merged, "workload": asdict(w), "provider": lim.provider}  # fmt: skip
            block_end = done[0] + per_block(adapters)
            cage = _MemoryCage(lim.memory_mib)
            res = _run_child(job, lim.affinity, cage, tick)
            if lim.memory_mib is not None:
                report.limits["memory_limit_method"] = cage.method
            if res is None:  # killed by the limit: how much does it need?
                need_job = {**job, "workload": {**asdict(w), "warmup": 0, "runs": 1}}
                need = _run_child(need_job, lim.affinity, _MemoryCage(None), lambda what: None)
                report.does_not_fit.append(DoesNotFit(label, threads, lim.memory_mib, cage.method, need["memory"]["peak_mib"] if need else None))
                done[0] = block_end
                progress(min(done[0], total), total, f"{label} does not fit")
                continue
            report.runs += [_run_figures(r) for r in res["runs"]]
            m = res["memory"]
            report.memory.append(MemoryFigures(**m, package_mib=facts[labels.index(label)].package_mib, limit_mib=lim.memory_mib,
                                               limit_method=cage.method))  # fmt: skip
            if cfg.op_profile:
                ops = _run_child({**job, "kind": "ops"}, lim.affinity, _MemoryCage(None), tick)
                report.ops += [OpShare(**o) for o in ops["ops"]]
            if cfg.ranks or cfg.adapter_counts:
                sw = _run_child({**job, "kind": "sweep", "ranks": list(cfg.ranks), "counts": list(cfg.adapter_counts)},
                                lim.affinity, _MemoryCage(None), tick)  # fmt: skip
                report.sweeps += [SweepPoint(**p) for p in sw["sweeps"]]
    report.comparison = _compare(report)
    return report


def _labels(packages: tuple[Path, ...]) -> list[str]:
    names = [Path(p).resolve().name or str(p) for p in packages]
    if len(set(names)) < len(names):
        names = [f"{chr(ord('A') + i)}:{n}" for i, n in enumerate(names)]
    return names


def _choose_adapters(pkg: Path, manifest: dict, wanted: tuple[str, ...] | None) -> list[str | None]:
    have = sorted(n for n, i in manifest.get("adapters", {}).items() if i.get("file"))
    if wanted is None:
        return [None] + have
    out: list[str | None] = []
    for a in wanted:
        if a.lower() == "none":
            out.append(None)
        elif a in have:
            out.append(a)
        elif manifest.get("adapters", {}).get(a, {}).get("merged"):
            out.append(None)  # merged into the weights: the base row is this adapter
        else:
            raise RuntimeInputError(f"unknown adapter {a!r} in {pkg}; it has: {', '.join(have) or 'none'}")
    return list(dict.fromkeys(out))


def _run_figures(r: dict) -> RunFigures:
    return RunFigures(**{**r, "ttft_ms": Spread(**r["ttft_ms"]), "prefill_tps": Spread(**r["prefill_tps"]),
                         "decode_tps": Spread(**r["decode_tps"]), "token_ms": Percentiles(**r["token_ms"])})  # fmt: skip


def _compare(report: ProfileReport) -> list[dict]:
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


def _run_child(job: dict, affinity, cage: _MemoryCage, tick: Callable[[str], None]) -> dict | None:
    """Run one job in a child; None if the memory limit killed it. Raises on any other failure."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    job = {**job, "affinity": list(affinity) if affinity else None}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lora_edge.profile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, preexec_fn=cage.preexec)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        cage.close()
        raise RuntimeInputError(f"cannot start the measuring process: {exc}") from None
    result: dict = {}
    err_lines: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:
            with _suppress():
                msg = json.loads(line)
                if "tick" in msg:
                    tick(msg["tick"])
                else:
                    result.update(msg)

    def read_err() -> None:
        err_lines.extend(proc.stderr)

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except OSError:
        pass
    try:
        cage.watch(proc)
        rc = proc.wait()
        for t in readers:
            t.join()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        killed = cage.killed_by_limit(proc.returncode if proc.returncode is not None else 0)
        cage.close()
    if killed:
        return None
    if "error" in result:
        raise RuntimeInputError(result["error"])
    if rc != 0 or not result:
        tail = "".join(err_lines).strip().splitlines()[-1:] or [f"exit code {rc}"]
        raise RuntimeInputError(f"the measuring process failed on {job['package']}: {tail[0]}")
    return result


# ---------------------------------------------------------------------------------------------
# the child: measures, prints JSON lines


def _child_main() -> None:
    job = json.loads(sys.stdin.read())
    if job.get("affinity"):
        os.sched_setaffinity(0, job["affinity"])  # before onnxruntime starts its threads

    def emit(msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    try:
        fn = {"measure": _measure, "ops": _ops, "sweep": _sweep}[job["kind"]]
        emit(fn(job, lambda what: emit({"tick": what})))
    except (PackageError, RuntimeInputError, InputError) as exc:
        emit({"error": str(exc)})
    except MemoryError:
        sys.exit(137)


def _prompt(model, n: int) -> list[int]:
    """n real tokens (a shipped text, repeated) when the package has a tokenizer, else fixed ids."""
    if (model.root / "tokenizer.json").is_file():
        words = model.tokenizer.encode((Path(__file__).parent / "data" / "verify_text.txt").read_text(), chat=False)
    else:
        words = [(7 * i + 3) % model.vocab_size for i in range(97)]
    return (words * (n // len(words) + 1))[:n]


def _decode(model, step, prompt, batch: int, new: int) -> tuple[float, list[float]]:
    """Time to first token and each later step's latency (seconds), forced to ``new`` tokens."""
    import numpy as np

    ids = np.asarray([prompt] * batch, np.int64)
    t0 = time.perf_counter()
    nxt = np.argmax(step(ids, len(prompt)), axis=-1)
    ttft = time.perf_counter() - t0
    lat = []
    total = len(prompt)
    for _ in range(new - 1):
        total += 1
        t = time.perf_counter()
        nxt = np.argmax(step(nxt[:, None].astype(np.int64), total), axis=-1)
        lat.append(time.perf_counter() - t)
    return ttft, lat


def _load_child(job: dict, **kw):
    from .runtime import load

    return load(job["package"], threads=job["threads"], providers=[job["provider"]] if job["provider"] else None, verify=False, **kw)


def _measure(job: dict, tick) -> dict:
    import numpy as np

    import onnxruntime  # noqa: F401  (counted in the runtime's baseline)

    from . import runtime  # noqa: F401

    w = Workload(**{**job["workload"], "prompt_tokens": tuple(job["workload"]["prompt_tokens"])})
    baseline = _rss_of() / MiB
    t0 = time.perf_counter()
    model = _load_child(job)
    load_s = time.perf_counter() - t0
    loaded = _rss_of() / MiB
    adapters_bytes = sum(_ortvalue_bytes(v) for a in model.adapters for v in model.check_adapter(a).values())
    ranks = {n: i.get("rank") for n, i in model.manifest.get("adapters", {}).items()}
    runs = []
    prompts = {n: _prompt(model, n) for n in w.prompt_tokens}  # tokenized once, not per adapter
    for adapter in job["adapters"]:
        for n, prompt in prompts.items():
            ttfts, lats = [], []
            for k in range(w.warmup + w.runs):
                step = model.steps(adapter, n + w.new_tokens, w.batch)
                ttft, lat = _decode(model, step, prompt, w.batch, w.new_tokens)
                if k >= w.warmup:
                    ttfts.append(ttft)
                    lats.append(lat)
                tick(f"{job['label']} {adapter or 'none'} prompt {n}")
            io_times, bind_times = [], []
            for _ in range(200):  # switching to an adapter this thread has used: a pooled binding
                t = time.perf_counter()
                io = model._acquire(adapter)
                io_times.append(time.perf_counter() - t)
                model._release(adapter, io)
            for _ in range(20):  # the first use of an adapter on a thread: binding its tensors
                t = time.perf_counter()
                model._binding(adapter)
                bind_times.append(time.perf_counter() - t)
            name = adapter or job.get("merged") or "none"
            runs.append({
                "package": job["label"], "adapter": name, "merged": adapter is None and bool(job.get("merged")),
                "rank": ranks.get(name), "threads": job["threads"], "prompt_tokens": n, "new_tokens": w.new_tokens,
                "batch": w.batch, "runs": w.runs,
                "ttft_ms": asdict(Spread.of([1000 * t for t in ttfts])),
                "prefill_tps": asdict(Spread.of([w.batch * n / t for t in ttfts])),
                "decode_tps": asdict(Spread.of([w.batch * len(lat) / sum(lat) for lat in lats])),
                "token_ms": asdict(Percentiles.of([1000 * t for lat in lats for t in lat])),
                "switch_us": float(np.median(io_times) * 1e6), "first_bind_us": float(np.median(bind_times) * 1e6),
                "provider": model.providers[0],
            })  # fmt: skip
    kv = 2 * model.num_layers * model.num_kv_heads * model.head_dim * (max(w.prompt_tokens) + w.new_tokens) * w.batch * 4
    adapters_mib = adapters_bytes / MiB
    return {"runs": runs, "memory": {
        "package": job["label"], "threads": job["threads"], "load_s": load_s, "baseline_mib": baseline, "loaded_mib": loaded,
        "peak_mib": _hwm(), "weights_mib": max(0.0, loaded - baseline - adapters_mib), "adapters_mib": adapters_mib,
        "kv_cache_mib": kv / MiB}}  # fmt: skip


def _ortvalue_bytes(v) -> int:
    itemsize = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int8)": 1}.get(v.data_type(), 4)
    return int(math.prod(v.shape())) * itemsize


def _ops(job: dict, tick) -> dict:
    """Per adapter: a short generation under ONNX Runtime's profiler; decode calls only."""
    w = job["workload"]
    n, new = min(w["prompt_tokens"]), min(w["new_tokens"], 32)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for adapter in job["adapters"]:
            model = _load_child(job, profile_prefix=str(Path(tmp) / "ort"))
            prompt = _prompt(model, n)
            _decode(model, model.steps(adapter, n + new, w["batch"]), prompt, w["batch"], new)  # warm-up
            _decode(model, model.steps(adapter, n + new, w["batch"]), prompt, w["batch"], new)
            trace = json.loads(Path(model.session.end_profiling()).read_text())
            runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
            decode_windows = runs[len(runs) // 2 + 1 :]  # the second generation, without its prefill call
            lo = decode_windows[0]["ts"] if decode_windows else float("inf")
            totals: dict[str, float] = {}
            lora, fused = 0.0, False
            for e in trace:
                if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < lo:
                    continue
                op = e.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + e["dur"]
                if e["name"].startswith("lora/"):
                    lora += e["dur"]
                fused = fused or e["name"].startswith("lora+base/")
            all_ = sum(totals.values()) or 1.0
            out.append({"package": job["label"], "adapter": adapter or job.get("merged") or "none", "threads": job["threads"],
                        "lora_pct": None if fused else 100 * lora / all_,
                        "by_op": {k: round(100 * v / all_, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}})  # fmt: skip
            del model
            tick(f"{job['label']} profiler {adapter or 'none'}")
    return {"ops": out}


def _sweep(job: dict, tick) -> dict:
    """Rank sweep: decode speed with synthetic adapters of each rank on every slot. Adapter sweep:
    resident memory with 0..N copies of the package's largest adapter file loaded (read as the runtime reads them)."""
    import numpy as np
    import onnxruntime as ort

    from .runtime import _load_adapter, ranked_shapes, slot_shapes

    w = job["workload"]
    n, new, batch = min(w["prompt_tokens"]), w["new_tokens"], w["batch"]
    model = _load_child(job)
    slots = model.manifest["slots"]
    prompt = _prompt(model, n)
    points = []

    def tps(adapter) -> float:
        best = 0.0
        for _ in range(max(1, w["runs"])):
            _, lat = _decode(model, model.steps(adapter, n + new, batch), prompt, batch, new)
            best = max(best, batch * len(lat) / sum(lat))
        return best

    if job["counts"]:
        files = [(model.root / i["file"], n_) for n_, i in model.manifest.get("adapters", {}).items() if i.get("file")]
        if not files:
            raise InputError(f"{job['package']} has no adapter files; the adapter-count sweep loads copies of one")
        path, name = max(files, key=lambda f: f[0].stat().st_size)
        slot_inputs = slot_shapes(slots)
        held = []
        identity = model.manifest["base"]["identity"]
        for c in sorted(job["counts"]):
            while len(held) < c:
                held.append(_load_adapter(path, name, identity, slot_inputs))
            points.append({"package": job["label"], "kind": "adapters", "value": c, "threads": job["threads"],
                           "rss_mib": _rss_of() / MiB, "adapter_file_mib": path.stat().st_size / MiB})  # fmt: skip
            tick(f"{job['label']} {c} adapters")
    if job["ranks"]:
        _decode(model, model.steps(None, n + new, batch), prompt, batch, new)  # warm-up
        none_tps = tps(None)
        rng = np.random.default_rng(0)
        kernel = model.manifest["graph"].get("lora_kernel")  # native packages store A/B as float16 or int8
        if kernel:
            from .adapters import EMBEDDING
            from .native import encode

            stored_pairs = [(s["lora_A"], s["lora_B"]) for s in slots if s["name"] != EMBEDDING]
        for r in job["ranks"]:
            arrays = {}
            for s in slots:
                for name, shape in ranked_shapes(s, r).items():
                    arrays[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            if kernel:
                arrays = encode(arrays, stored_pairs, kernel["dtype"], kernel.get("blob", {}).get("slots", ()))
            model._adapters[f"rank{r}"] = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
            t = tps(f"rank{r}")
            points.append({"package": job["label"], "kind": "rank", "value": r, "threads": job["threads"], "decode_tps": t,
                           "branch_cost_pct": 100 * (none_tps / t - 1)})  # fmt: skip
            del model._adapters[f"rank{r}"], arrays
            tick(f"{job['label']} rank {r}")
    return {"sweeps": points}


# ---------------------------------------------------------------------------------------------
# rendering


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
        lines += ["", _table(["package", "thr", "load s", "on disk MiB", "runtime MiB", "weights MiB", "adapters MiB", "KV cache MiB",
                              "peak RSS MiB", "limit"],
                             [[x.package, x.threads, f"{x.load_s:.2f}", f"{x.package_mib:.1f}", f"{x.baseline_mib:.0f}",
                               f"{x.weights_mib:.0f}", f"{x.adapters_mib:.1f}", f"{x.kv_cache_mib:.1f}", f"{x.peak_mib:.0f}",
                               f"{x.limit_mib} MiB ({x.limit_method})" if x.limit_mib else "-"] for x in report.memory])]  # fmt: skip
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
                         f"{per:.1f}" if per is not None else "-", f"{pts[0].adapter_file_mib:.1f}"])  # fmt: skip
        lines += ["", _table(["package", "thr", "adapters loaded", "RSS MiB", "MiB per adapter (fit)", "adapter file MiB"], rows)]
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


def _share(o: OpShare | None) -> str:
    """The LoRA share column: a percentage, "in base" (kernel v4: the branch runs inside the int4
    projection's node, so the profiler cannot tell its time apart), or "-" when not profiled."""
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
    for part in ("baseline_mib", "weights_mib", "adapters_mib", "kv_cache_mib"):
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


if __name__ == "__main__":
    _child_main()
