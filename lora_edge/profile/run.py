"""The parent side of a profile: check the packages, plan one child per package x thread count (and per kind of
measurement), run them under the limits, and collect their figures into a :class:`ProfileReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError, RuntimeInputError
from ..package.manifest import Manifest
from ..package.store import read_manifest
from ..runtime.adapter_set import parse_choice
from .child import Job, run_child
from .config import ProfileConfig
from .report import SCHEMA, DoesNotFit, MemoryFigures, OpShare, PackageFacts, ProfileReport, RunFigures, SweepPoint, compare
from .sandbox import MemoryCage, MiB, machine_info

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass(frozen=True)
class Plan:
    facts: PackageFacts
    package: Path
    adapters: list[str | None]  # None: the base
    merged: str | None  # the adapter merged into a merge-mode package's weights


def profile(cfg: ProfileConfig, progress: Progress | None = None) -> ProfileReport:
    progress = progress or (lambda done, total, what: None)
    plans = [plan(label, pkg, cfg) for label, pkg in zip(labels(cfg.packages), cfg.packages)]

    w, lim = cfg.workload, cfg.limits
    def per_block(ads) -> int:  # progress steps of one package x thread count
        return len(ads) * len(w.prompt_tokens) * (w.warmup + w.runs) + (len(ads) if cfg.op_profile else 0) + len(cfg.ranks) + len(cfg.adapter_counts)

    total = sum(len(lim.threads) * per_block(p.adapters) for p in plans)
    done = [0]

    def tick(what: str) -> None:
        done[0] += 1
        progress(min(done[0], total), total, what)

    report = ProfileReport(schema=SCHEMA, machine=machine_info(), workload=asdict(w), limits=asdict(lim),
                           packages=[p.facts for p in plans], runs=[], memory=[], ops=[], sweeps=[], does_not_fit=[])  # fmt: skip
    report.limits["memory_limit_method"] = None  # set by the first limited run: cgroup-v2, cgroup-v1 or rss-watchdog
    for p in plans:
        label = p.facts.label
        for threads in lim.threads:
            job: Job = {"kind": "measure", "package": str(p.package), "label": label, "threads": threads, "adapters": p.adapters,
                        "merged": p.merged, "workload": asdict(w), "provider": lim.provider}  # fmt: skip
            block_end = done[0] + per_block(p.adapters)
            cage = MemoryCage(lim.memory_mib)
            res = run_child(job, lim.affinity, cage, tick)
            if lim.memory_mib is not None:
                report.limits["memory_limit_method"] = cage.method
            if res is None:  # killed by the limit: how much does it need?
                need_job: Job = {**job, "workload": {**asdict(w), "warmup": 0, "runs": 1}}
                need = run_child(need_job, lim.affinity, MemoryCage(None), lambda what: None)
                report.does_not_fit.append(DoesNotFit(label, threads, lim.memory_mib, cage.method, need["memory"]["peak_mib"] if need else None))
                done[0] = block_end
                progress(min(done[0], total), total, f"{label} does not fit")
                continue
            report.runs += [RunFigures.from_json(r) for r in res["runs"]]
            report.memory.append(MemoryFigures(**res["memory"], package_mib=p.facts.package_mib, limit_mib=lim.memory_mib,
                                               limit_method=cage.method))  # fmt: skip
            if cfg.op_profile:
                ops = run_child({**job, "kind": "ops"}, lim.affinity, MemoryCage(None), tick)
                report.ops += [OpShare(**o) for o in ops["ops"]]
            if cfg.ranks or cfg.adapter_counts:
                sw = run_child({**job, "kind": "sweep", "ranks": list(cfg.ranks), "counts": list(cfg.adapter_counts)},
                               lim.affinity, MemoryCage(None), tick)  # fmt: skip
                report.sweeps += [SweepPoint(**s) for s in sw["sweeps"]]
    report.comparison = compare(report)
    return report


def plan(label: str, pkg: Path, cfg: ProfileConfig) -> Plan:
    """Check one package before any child starts (checksums, kind, adapters, sweeps) and gather its facts."""
    manifest = read_manifest(pkg, verify=True)
    if manifest.spec.is_encoder:
        raise InputError(f"{pkg} is an encoder package; `profile` measures generation (time to first token, decode tokens/s)")
    if (cfg.ranks or cfg.adapter_counts) and not manifest.slots:
        raise InputError(f"{pkg} has no LoRA slots (a merged package); rank and adapter-count sweeps need a branch package")
    files = manifest.files
    facts = PackageFacts(label=label, path=str(pkg), quant=manifest.quantization.weights.value, mode=manifest.mode.value,
                         attention=manifest.graph.attention.value, package_mib=manifest.size() / MiB,
                         adapter_file_mib={n: (files[f].bytes if f in files else 0) / MiB for n, f in manifest.adapter_files().items()})  # fmt: skip
    merged = [n for n, a in manifest.adapters.items() if a.merged]
    return Plan(facts, pkg, choose_adapters(pkg, manifest, cfg.adapters), merged[0] if merged else None)


def labels(packages: tuple[Path, ...]) -> list[str]:
    """Each package's name in the report: its directory's name, prefixed A:, B:, ... where two names are the same."""
    names = [Path(p).resolve().name or str(p) for p in packages]
    if len(set(names)) < len(names):
        names = [f"{chr(ord('A') + i)}:{n}" for i, n in enumerate(names)]
    return names


def choose_adapters(pkg: Path, manifest: Manifest, wanted: tuple[str, ...] | None) -> list[str | None]:
    have = sorted(manifest.adapter_files())
    if wanted is None:
        return [None] + have
    out: list[str | None] = []
    for a in wanted:
        choice = parse_choice(a)
        if choice is None:
            out.append(None)
        elif isinstance(choice, dict) and set(choice) <= set(have):  # a strength or a blend, as `run` takes them
            out.append(a)
        elif a in have:
            out.append(a)
        elif a in manifest.adapters and manifest.adapters[a].merged:
            out.append(None)  # merged into the weights: the base row is this adapter
        else:
            raise RuntimeInputError(f"unknown adapter {a!r} in {pkg}; it has: {', '.join(have) or 'none'}")
    return list(dict.fromkeys(out))
