"""The measurements, run inside the child process (:mod:`lora_edge.profile.child`); each returns JSON data.

- :func:`measure`: prefill is the first graph call on the prompt (time to first token includes binding the adapter
  and allocating the KV cache); decode is every later call, one token each, forced to the full length. Each
  configuration runs ``warmup`` times unmeasured, then ``runs`` times. Also the process's memory, by part.
- :func:`ops`: a short generation under ONNX Runtime's profiler, decode time split between the LoRA branch nodes
  (named ``lora/...`` in the graph) and the base, per operator type.
- :func:`sweep`: decode speed against adapter rank, resident memory against the number of adapters loaded.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

# loaded with this module, before measure() takes its baseline: their memory is the runtime's, not the package's
import numpy as np
import onnxruntime as ort

from ..adapters.layout import ranked_shapes
from ..adapters.storage import Storage
from ..errors import InputError
from ..native.encode import encode
from ..package.manifest import EMBEDDING
from ..runtime import DecoderModel, load
from ..runtime.adapter_set import parse_choice
from ..runtime.pages import after_loading
from .child import Job
from .config import DATA, Workload
from .report import Percentiles, Spread
from .sandbox import MiB, peak_mib, resident_parts, rss_of

Tick = Callable[[str], None]
SWITCHES, FIRST_BINDS = 200, 20  # repetitions of the (microsecond) binding figures, for a stable median
OPS_MAX_NEW = 32  # tokens per generation under the profiler, which slows every call


def measure(job: Job, tick: Tick) -> dict:
    w = Workload(**{**job["workload"], "prompt_tokens": tuple(job["workload"]["prompt_tokens"])})
    after_loading()  # as loading the package will: the baseline is the runtime less what importing it read once
    baseline = rss_of() / MiB
    t0 = time.perf_counter()
    model = load_model(job)
    load_s = time.perf_counter() - t0
    # (the runtime reads a shipped adapter when a call first chooses one; every one of them runs here)
    adapters_bytes = sum(ortvalue_bytes(v) for a in model.adapters for v in model.check_adapter(a).values())
    loaded = rss_of() / MiB
    tokenizer = tokenizer_mib(model)
    ranks = {n: a.rank for n, a in model.manifest.adapters.items()}
    runs = []
    prompts = {n: prompt_ids(model, n) for n in w.prompt_tokens}  # tokenized once, not per adapter
    for adapter in job["adapters"]:
        for n, prompt in prompts.items():
            ttfts, lats = [], []
            for k in range(w.warmup + w.runs):
                ttft, lat = decode(model.steps(choice(adapter), n + w.new_tokens, w.batch), prompt, w.batch, w.new_tokens)
                if k >= w.warmup:
                    ttfts.append(ttft)
                    lats.append(lat)
                tick(f"{job['label']} {adapter or 'none'} prompt {n}")
            switch, first_bind = binding_times(model, choice(adapter))
            name = adapter or job["merged"] or "none"
            runs.append({
                "package": job["label"], "adapter": name, "merged": adapter is None and bool(job["merged"]),
                "rank": ranks.get(name), "threads": job["threads"], "prompt_tokens": n, "new_tokens": w.new_tokens,
                "batch": w.batch, "runs": w.runs,
                "ttft_ms": asdict(Spread.of([1000 * t for t in ttfts])),
                "prefill_tps": asdict(Spread.of([w.batch * n / t for t in ttfts])),
                "decode_tps": asdict(Spread.of([w.batch * len(lat) / sum(lat) for lat in lats])),
                "token_ms": asdict(Percentiles.of([1000 * t for lat in lats for t in lat])),
                "switch_us": switch * 1e6, "first_bind_us": first_bind * 1e6,
                "provider": model.providers[0],
            })  # fmt: skip
    kv = 2 * model.num_layers * model.num_kv_heads * model.head_dim * (max(w.prompt_tokens) + w.new_tokens) * w.batch * 4
    adapters_mib = adapters_bytes / MiB
    parts = resident_parts(model.root)  # after the runs: what a process serving this workload holds
    return {"runs": runs, "memory": {
        "package": job["label"], "threads": job["threads"], "load_s": load_s, "baseline_mib": baseline, "loaded_mib": loaded,
        "peak_mib": peak_mib(), "weights_mib": max(0.0, loaded - baseline - adapters_mib), "adapters_mib": adapters_mib,
        "per_adapter_mib": adapters_mib / len(model.adapters) if model.adapters else 0.0,
        "mapped_mib": parts["mapped"], "anonymous_mib": parts["anonymous"], "libraries_mib": parts["libraries"],
        "kv_cache_mib": kv / MiB, "tokenizer_mib": tokenizer}}  # fmt: skip


def tokenizer_mib(model: DecoderModel) -> float:
    """What the tokenizer and the chat template's renderer hold once parsed (0 without tokenizer.json)."""
    if not (model.root / "tokenizer.json").is_file():
        return 0.0
    before = rss_of()
    model.tokenizer.encode("Hi", chat=True)
    return max(0.0, (rss_of() - before) / MiB)


def choice(label: str | None):
    """A job's adapter label as the runtime takes it (a name, or a strength or blend written as `run` takes them)."""
    return parse_choice(label) if label else None


def binding_times(model: DecoderModel, adapter: str | None) -> tuple[float, float]:
    """Median seconds of switching to ``adapter`` on a thread that has used it (its pooled binding, taken and
    given back), and of binding its tensors the first time on a thread (a new binding)."""
    switch, first = [], []
    for _ in range(SWITCHES):
        t = time.perf_counter()
        with model.bound(adapter):
            pass
        switch.append(time.perf_counter() - t)
    for _ in range(FIRST_BINDS):
        t = time.perf_counter()
        model.binding(adapter)
        first.append(time.perf_counter() - t)
    return float(np.median(switch)), float(np.median(first))


def ops(job: Job, tick: Tick) -> dict:
    """Per adapter, a fresh session under ONNX Runtime's profiler: one generation to warm up, one measured."""
    w = job["workload"]
    n, new = min(w["prompt_tokens"]), min(w["new_tokens"], OPS_MAX_NEW)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for adapter in job["adapters"]:
            model = load_model(job, profile_prefix=str(Path(tmp) / "ort"))
            prompt = prompt_ids(model, n)
            for _ in range(2):
                decode(model.steps(choice(adapter), n + new, w["batch"]), prompt, w["batch"], new)
            lora_pct, by_op = op_shares(json.loads(Path(model.session.end_profiling()).read_text()))
            out.append({"package": job["label"], "adapter": adapter or job["merged"] or "none", "threads": job["threads"],
                        "lora_pct": lora_pct, "by_op": by_op})  # fmt: skip
            del model
            tick(f"{job['label']} profiler {adapter or 'none'}")
    return {"ops": out}


def op_shares(trace: list[dict]) -> tuple[float | None, dict[str, float]]:
    """From an ONNX Runtime trace of two generations: the LoRA branches' share of the second one's decode operator
    time (None where they run inside the base projections' nodes, ``lora+base/...``, which the profiler cannot
    split), and each operator type's share (%), largest first."""
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
    by_op = {k: round(100 * v / all_, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return None if fused else 100 * lora / all_, by_op


def sweep(job: Job, tick: Tick) -> dict:
    """Adapter sweep: resident memory with 0..N copies of the package's largest adapter file loaded (read as the
    runtime reads them). Rank sweep: decode speed with a synthetic adapter of each rank on every slot."""
    points = []
    model = load_model(job)
    # tokenized before the adapter sweep: its resident figures include the tokenizer, as a serving process's would
    prompt = prompt_ids(model, min(job["workload"]["prompt_tokens"]))
    if job["counts"]:
        points += count_sweep(job, model, tick)
    if job["ranks"]:
        points += rank_sweep(job, model, prompt, tick)
    return {"sweeps": points}


def count_sweep(job: Job, model: DecoderModel, tick: Tick) -> list[dict]:
    manifest = model.manifest
    files = [(model.root / f, name) for name, f in manifest.adapter_files().items()]
    if not files:
        raise InputError(f"{job['package']} has no adapter files; the adapter-count sweep loads copies of one")
    path, name = max(files, key=lambda f: f[0].stat().st_size)
    storage = Storage.of(manifest)
    held, points = [], []
    for c in sorted(job["counts"]):
        while len(held) < c:
            held.append(storage.read(path, name))
        points.append({"package": job["label"], "kind": "adapters", "value": c, "threads": job["threads"],
                       "rss_mib": rss_of() / MiB, "adapter_file_mib": path.stat().st_size / MiB})  # fmt: skip
        tick(f"{job['label']} {c} adapters")
    return points


def rank_sweep(job: Job, model: DecoderModel, prompt: list[int], tick: Tick) -> list[dict]:
    w = job["workload"]
    n, new, batch = len(prompt), w["new_tokens"], w["batch"]

    def tps(adapter: str | None) -> float:
        best = 0.0
        for _ in range(max(1, w["runs"])):
            _, lat = decode(model.steps(adapter, n + new, batch), prompt, batch, new)
            best = max(best, batch * len(lat) / sum(lat))
        return best

    decode(model.steps(None, n + new, batch), prompt, batch, new)  # warm-up
    none_tps = tps(None)
    rng = np.random.default_rng(0)
    slots = model.manifest.slots
    kernel = model.manifest.kernel  # native packages store A/B as the kernel reads them (float16, int8, the w8a8 blob)
    stored_pairs = [(s.lora_A, s.lora_B) for s in slots if s.name != EMBEDDING]
    points = []
    for r in job["ranks"]:
        arrays = {}
        for s in slots:
            for name, shape in ranked_shapes(s, r).items():
                arrays[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        if kernel:
            arrays = encode(arrays, stored_pairs, kernel.dtype, kernel.blob.slots if kernel.blob else ())
        model.add_adapter(f"rank{r}", arrays)
        t = tps(f"rank{r}")
        points.append({"package": job["label"], "kind": "rank", "value": r, "threads": job["threads"], "decode_tps": t,
                       "branch_cost_pct": 100 * (none_tps / t - 1)})  # fmt: skip
        model.unload_adapter(f"rank{r}")
        del arrays
        tick(f"{job['label']} rank {r}")
    return points


# -- helpers ----------------------------------------------------------------------------------
def load_model(job: Job, **kw) -> DecoderModel:
    """The job's package, without checksums: the parent verified them before planning."""
    return load(job["package"], threads=job["threads"], providers=[job["provider"]] if job["provider"] else None, verify=False, **kw)


def prompt_ids(model: DecoderModel, n: int) -> list[int]:
    """n real tokens (a shipped text, repeated) when the package has a tokenizer, else fixed ids."""
    if (model.root / "tokenizer.json").is_file():
        words = model.tokenizer.encode((DATA / "verify_text.txt").read_text(), chat=False)
    else:
        words = [(7 * i + 3) % model.vocab_size for i in range(97)]
    return (words * (n // len(words) + 1))[:n]


def decode(step, prompt: list[int], batch: int, new: int) -> tuple[float, list[float]]:
    """Time to first token and each later step's latency (seconds), forced to ``new`` tokens."""
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


def ortvalue_bytes(v: ort.OrtValue) -> int:
    itemsize = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int8)": 1}.get(v.data_type(), 4)
    return int(math.prod(v.shape())) * itemsize
