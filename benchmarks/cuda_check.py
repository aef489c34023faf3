"""The CUDA check: parity and speed of a `--target cuda` package on an NVIDIA GPU, in one short run.

On the GPU machine (onnxruntime-gpu installed; no torch needed):

    lora-edge export SmolLM2.gguf -a pirate=examples/adapters/pirate -a shout=examples/adapters/shout \\
        -q int4 --target cuda -o pkg-cuda            # anywhere; copy pkg-cuda over
    python benchmarks/cuda_check.py pkg-cuda --json cuda.json

What it checks, for no adapter and every adapter of the package:
- the same package on CUDAExecutionProvider and on CPUExecutionProvider: max |Δlogits| over a
  128-token text (float16 on both sides, different kernels: tolerance 0.05 on logits of magnitude
  ~20, i.e. float16's relative precision times a 30-layer depth), top-1 agreement, and 32 greedy
  tokens (must be identical, or differ only after a near-tie);
- that an adapter changes the GPU logits (adapters are really bound on the device), and that
  A -> none -> A gives bit-identical logits (switching leaves nothing behind);
- decode tokens/s (128 forced new tokens after a 128-token prompt), time to first token, adapter
  switch time (binding the device-resident tensors) and GPU memory in use (nvidia-smi, when present).
Exit code 1 when a parity check fails. Runs in about a minute on an H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def gpu_memory_mib() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    try:
        return float(out.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def decode_speed(model, adapter, prompt, new: int, runs: int = 3) -> dict:
    best = None
    for _ in range(runs + 1):  # the first is the warm-up
        step = model.steps(adapter, len(prompt) + new)
        t0 = time.perf_counter()
        nxt = np.argmax(step(np.asarray([prompt]), len(prompt)), -1)
        t1 = time.perf_counter()
        total = len(prompt)
        for _ in range(new - 1):
            total += 1
            nxt = np.argmax(step(nxt[:, None].astype(np.int64), total), -1)
        t2 = time.perf_counter()
        fig = {"ttft_ms": 1000 * (t1 - t0), "decode_tps": (new - 1) / (t2 - t1)}
        best = fig if best is None or fig["decode_tps"] > best["decode_tps"] else best
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("--tokens", type=int, default=128, help="prompt length (and forced new tokens)")
    ap.add_argument("--logit-tol", type=float, default=0.05)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    import lora_edge

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider: pip install onnxruntime-gpu", file=sys.stderr)
        return 2
    gpu = lora_edge.load(args.package, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = lora_edge.load(args.package, providers=["CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider", gpu.providers
    text = (ROOT / "lora_edge/data/verify_text.txt").read_text()
    ids = gpu.tokenizer.encode(text, chat=False)[: args.tokens]
    chat = gpu.tokenizer.encode("What is the capital of Italy?", chat=True)
    report = {"package": str(args.package), "onnxruntime": ort.__version__, "providers": gpu.providers,
              "compute_dtype": str(gpu.dtype), "gpu_mib_loaded": gpu_memory_mib(), "adapters": {}}  # fmt: skip
    ok = True
    base_logits = None
    for a in [None, *gpu.adapters]:
        g, c = gpu.forward(ids, a), cpu.forward(ids, a)
        diff = float(np.abs(g - c).max())
        top1 = float((g.argmax(-1) == c.argmax(-1)).mean())
        greedy_g, _ = gpu.generate_ids(chat, a, 32)
        greedy_c, _ = cpu.generate_ids(chat, a, 32)
        same_prefix = next((i for i, (x, y) in enumerate(zip(greedy_g, greedy_c)) if x != y), min(len(greedy_g), len(greedy_c)))
        row = {"max_abs_logit_diff_vs_cpu": diff, "top1_agreement_vs_cpu": top1, "greedy_identical": greedy_g == greedy_c,
               "greedy_same_prefix": same_prefix, "text": gpu.tokenizer.decode(greedy_g)}  # fmt: skip
        if a is None:
            base_logits = g
        else:
            row["adapter_changes_logits"] = float(np.abs(g - base_logits).max())
            gpu.forward(ids, None)
            row["switch_bit_identical"] = bool(np.array_equal(gpu.forward(ids, a), g))
            io_t = []
            for _ in range(200):
                t = time.perf_counter()
                gpu._binding(a)
                io_t.append(time.perf_counter() - t)
            row["switch_us"] = float(np.median(io_t) * 1e6)
            ok &= row["adapter_changes_logits"] > 1e-3 and row["switch_bit_identical"]
        row.update(decode_speed(gpu, a, ids, args.tokens))
        row["cpu_decode_tps"] = decode_speed(cpu, a, ids, min(32, args.tokens), runs=1)["decode_tps"]
        ok &= diff <= args.logit_tol and top1 >= 0.98 and same_prefix >= 16
        report["adapters"][a or "none"] = row
        print(json.dumps({a or "none": row}), flush=True)
    report["gpu_mib_peak"] = gpu_memory_mib()
    report["passed"] = bool(ok)
    print(f"\n{'adapter':10} {'max|Δ| vs CPU':>14} {'top-1':>6} {'greedy':>8} {'decode tok/s GPU':>17} {'CPU':>6} {'TTFT ms':>8}")
    for name, r in report["adapters"].items():
        print(f"{name:10} {r['max_abs_logit_diff_vs_cpu']:14.4f} {100 * r['top1_agreement_vs_cpu']:5.1f}% "
              f"{'same' if r['greedy_identical'] else r['greedy_same_prefix']:>8} {r['decode_tps']:17.1f} {r['cpu_decode_tps']:6.1f} {r['ttft_ms']:8.1f}")  # fmt: skip
    print("PASSED" if ok else "FAILED")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
