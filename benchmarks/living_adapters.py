"""What a living adapter set costs on the device, on the real SmolLM2-135M-Instruct, side by side in one process:

    python benchmarks/living_adapters.py                 # fp32 and int4 (portable) packages, 1 thread
    python benchmarks/living_adapters.py --quants int4 --threads 2 --rounds 5

- switch: binding an adapter a thread has used (a pooled binding) and the first binding of one;
- strength / blend: preparing a combination the first time (a numpy concatenation per slot) and again (cached);
- load: `load_adapter` from the PEFT directory (converted with numpy) and from its .onnx_adapter file, and the
  resident memory each loaded adapter adds against its file's size;
- aLoRA: a conversation of --prefix tokens computed by the base, then the activated adapter's invocation and reply
  tokens: continuing from the base's KV cache against computing the whole conversation again with the adapter.

The aLoRA adapter is made here with PEFT (seeded, untrained: its values do not matter for time); the packages are
exported into --work (kept between runs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {n: ROOT / "examples" / "adapters" / n for n in ("pirate", "shout")}


def rss_mib() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def make_alora(base: Path, out: Path, invocation: list[int]) -> Path:
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_edge.compile.models.loader import load_hf_model

    torch.manual_seed(0)
    model = get_peft_model(load_hf_model(base), LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, init_lora_weights=False,
                                                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                                           alora_invocation_tokens=invocation))  # fmt: skip
    model.save_pretrained(out)
    return out


def build(work: Path, quant: str, base: Path, alora: Path) -> Path:
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec
    from lora_edge.recipes import export_config

    out = work / f"living-{quant}"
    if not (out / "manifest.json").is_file():
        adapters = (*(AdapterSpec(n, p) for n, p in ADAPTERS.items()), AdapterSpec("act", alora))
        export(export_config("exact" if quant == "fp32" else "portable", base=base, output=out, adapters=adapters, force=True),
               progress=print)  # fmt: skip
    return out


def measure(pkg: Path, threads: int, rounds: int, prefix: int, invocation: list[int]) -> dict:
    import lora_edge

    model = lora_edge.load(pkg, threads=threads)
    row: dict[str, float] = {}
    file = pkg / "adapters" / "pirate.onnx_adapter"
    gc.collect()  # first, before anything is freed for the allocator to reuse
    before = rss_mib()
    for i in range(16):
        model.load_adapter(f"copy{i}", file)
    gc.collect()
    row["RSS per loaded adapter MiB"] = (rss_mib() - before) / 16
    row["its tensors MiB"] = sum(v.numpy().nbytes for v in model.check_adapter("copy0").values()) / 2**20
    row["its file MiB"] = file.stat().st_size / 2**20
    def switch(adapter):
        with model.bound(adapter):
            pass

    switch("shout")
    row["switch (pooled) us"] = 1000 * median_ms(lambda: switch("shout"), 200)
    row["first bind us"] = 1000 * median_ms(lambda: model.binding("pirate"), 50)

    def prepare(choice):
        model._adapters._combined.clear()  # (the first preparation of a combination, every time)
        return model.check_adapter(choice)

    row["strength, first ms"] = median_ms(lambda: prepare({"pirate": 0.5}), rounds * 4)
    row["blend, first ms"] = median_ms(lambda: prepare({"pirate": 0.5, "shout": 0.5}), rounds * 4)
    model.check_adapter({"pirate": 0.5, "shout": 0.5})
    row["blend, cached us"] = 1000 * median_ms(lambda: model.check_adapter({"pirate": 0.5, "shout": 0.5}), 200)

    row["load PEFT dir ms"] = median_ms(lambda: model.load_adapter("p2", ADAPTERS["pirate"]), rounds)
    row["load .onnx_adapter ms"] = median_ms(lambda: model.load_adapter("p3", file), rounds)

    rng = np.random.default_rng(0)
    conversation = [int(t) for t in rng.integers(100, model.vocab_size - 1, prefix)]
    rest = [*invocation, *[int(t) for t in rng.integers(100, model.vocab_size - 1, 8)]]
    _, past = model.forward(np.array([conversation]), None, return_past=True)
    reuse = median_ms(lambda: model.forward(np.array([rest]), "act", past=past), rounds)
    again = median_ms(lambda: model.forward(np.array([conversation + rest]), "act"), rounds)
    row["aLoRA switch, reused cache ms"] = reuse
    row["aLoRA switch, new prefill ms"] = again
    row["prefill saved x"] = again / reuse
    return row


def main() -> None:
    import json
    import subprocess
    import sys

    from lora_edge.compile.realmodel import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefix", type=int, default=256, help="tokens of conversation computed before the switch")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--one", choices=["fp32", "int4"], help=argparse.SUPPRESS)  # a child: one package, JSON out
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = smollm2_gguf()
    invocation = [49152 - 100, 1, 2]  # any fixed token sequence: the adapter is untrained
    alora = make_alora(base, args.work / "alora-r16", invocation)
    if args.one:
        print(json.dumps(measure(build(args.work, args.one, base, alora), args.threads, args.rounds, args.prefix, invocation)))
        return
    rows = {}
    for q in args.quants:  # each in its own process: memory freed by one package would be reused by the next
        build(args.work, q, base, alora)
        cmd = [sys.executable, __file__, "--one", q, "--threads", str(args.threads), "--rounds", str(args.rounds),
               "--prefix", str(args.prefix), "--work", str(args.work)]  # fmt: skip
        rows[q] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"\n{args.threads} thread(s), {args.prefix}-token conversation before the aLoRA switch, median of {args.rounds}+ runs")
    print(f"| figure | {' | '.join(rows)} |\n|---|{'---|' * len(rows)}")
    for key in next(iter(rows.values())):
        print(f"| {key} | {' | '.join(f'{r[key]:.2f}' for r in rows.values())} |")


if __name__ == "__main__":
    main()
