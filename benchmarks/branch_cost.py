"""What an unmerged adapter costs on decode, measured the steady way: one process, packages alternated.

    python benchmarks/branch_cost.py                          # int4, int8, fp32 at 1 and 2 threads, 12 rounds
    python benchmarks/branch_cost.py --quants int4 --threads 1 --rounds 6 --new-tokens 64
    python benchmarks/branch_cost.py --quants int4 --threads 1 --rounds 4 --per-token   # alternated every token

`decode.py` runs every configuration in its own process (it needs each one's peak RSS), a few
tens of seconds apart, and this shared machine drifts by 25-40% over minutes, so its branch-vs-merged
column stays noisy even as a median over rounds. Here the merged package, the branch package with
r16all bound and the branch package with no adapter are loaded side by side in one process and run
in turn, one decode each, round after round; every round gives ratios to the merged model measured
seconds apart, and the table reports their median and range. The packages are the ones `decode.py`
builds (same --work folder; built here when missing).

"cost" is the target's figure: how much longer a decode step takes with r16all as a branch than
merged, at the same quantization and thread count (time ratio - 1; the target is <= 10%), for the
standard-MatMul branch ("onnx") and lora-edge's LoraDelta kernel ("native", `--lora-kernel native`,
float16 A/B; "native int8", `--lora-dtype int8`; "native w8a8", `--lora-dtype w8a8`: int8 A/B in the q8x order with
int8 activations; the kernel is built first, `--no-native` skips them).
For a recipe with float block offsets (int4) the kernel also runs the projections themselves (kernel v4:
MatMulQ4, or the branch's node taking the packed weight), so its merged package on the kernel ("merged
(native)", the speed-up over the plain merged package given beside it) is the reference of the native
rows: the same graph less the adapter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from decode import NATIVE_MERGED, QUANTS, RECIPES, ROOT, build


def decode_tps(model, prompt: list[int], adapter: str | None, new: int) -> float:
    """Decode tokens/s of one forced-length generation (the prompt pass excluded)."""
    stamps: list[float] = []
    model.generate_ids(prompt, adapter, new, new, on_token=lambda _t: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def per_token_ms(runs: dict, prompt: list[int], new: int) -> dict[str, list[float]]:
    """Every configuration's decode steps, alternated token by token: each prefilled with ``prompt``, then one
    step of each in turn, ``new`` times; the ms of every step. Drift slower than a few steps (tens of ms)
    cancels out of the per-step ratios."""
    import numpy as np

    steps, nxt = {}, {}
    for k, (m, a) in runs.items():
        steps[k] = m.steps(a, len(prompt) + new + 1)
        nxt[k] = int(np.argmax(steps[k](np.asarray([prompt], np.int64), len(prompt))[0]))
    ms: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(new):
        for k in runs:
            t0 = time.perf_counter()
            logits = steps[k](np.asarray([[nxt[k]]], np.int64), len(prompt) + i + 1)
            ms[k].append(1e3 * (time.perf_counter() - t0))
            nxt[k] = int(np.argmax(logits[0]))
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", nargs="*", default=list(QUANTS), choices=list(RECIPES))
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-edge-bench"))
    ap.add_argument("--no-native", action="store_true", help="skip the --lora-kernel native packages (no C++ compiler here)")
    ap.add_argument("--per-token", action="store_true",
                    help="alternate the configurations every decode step (each round one generation of --new-tokens "
                         "steps per configuration, interleaved); cost = the median of the per-step time ratios. For 1 "
                         "thread: with more, the waiting sessions' thread pools spin against the running one")
    args = ap.parse_args()

    import lora_edge
    from lora_edge.compile.realmodel import smollm2_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    pkgs = build(args.work, smollm2_gguf(), args.quants, native=not args.no_native)
    print(f"\nSmolLM2-135M-Instruct, r16all (rank 16, all 7 projections); {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens forced; {args.rounds} rounds, one process, configurations alternated\n")  # fmt: skip
    kinds = ["branch", "none"] + ([] if args.no_native else ["native", "native8", "native8a8", "native-none"])
    label = {"branch": "branch (onnx)", "none": "no adapter (onnx)", "native": "branch (native)",
             "native8": "branch (native int8)", "native8a8": "branch (native w8a8)", "native-none": "no adapter (native)"}  # fmt: skip
    print("| quant | threads | merged tok/s | merged (native) tok/s, speed-up | "
          + " | ".join(f"{label[k]} tok/s, cost (range)" for k in kinds) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(kinds))
    prompt: list[int] = []  # made once, with the first package's tokenizer (every package carries the same one)
    for threads in args.threads:
        for q in args.quants:
            merged = lora_edge.load(pkgs[f"{q}-merged"], threads=threads)
            branch = lora_edge.load(pkgs[f"{q}-branch"], threads=threads)
            native = None if args.no_native else lora_edge.load(pkgs[f"{q}-native"], threads=threads)
            native8 = None if args.no_native else lora_edge.load(pkgs[f"{q}-native8"], threads=threads)
            native8a8 = None if args.no_native else lora_edge.load(pkgs[f"{q}-native8a8"], threads=threads)
            if not prompt:
                words = merged.tokenizer.encode((ROOT / "lora_edge/data/verify_text.txt").read_text(), chat=False)
                prompt = (words * (args.prompt_tokens // len(words) + 1))[: args.prompt_tokens]
            runs = {"merged": (merged, None), "branch": (branch, "r16all"), "none": (branch, None)}
            if native is not None:
                runs.update({"native": (native, "r16all"), "native8": (native8, "r16all"), "native8a8": (native8a8, "r16all"),
                             "native-none": (native, None)})  # fmt: skip
            if f"{q}-{NATIVE_MERGED}" in pkgs:
                runs[NATIVE_MERGED] = (lora_edge.load(pkgs[f"{q}-{NATIVE_MERGED}"], threads=threads), None)
            for m, a in runs.values():  # warm-up
                decode_tps(m, prompt[:16], a, 8)
            tps: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                if args.per_token:  # one "round" value per step: tok/s of that step
                    for k, v in per_token_ms(runs, prompt, args.new_tokens).items():
                        tps[k].extend(1e3 / t for t in v)
                    continue
                for k, (m, a) in runs.items():
                    tps[k].append(decode_tps(m, prompt, a, args.new_tokens))
            cells = ["-"]
            if NATIVE_MERGED in tps:
                up = statistics.median(y / x for x, y in zip(tps["merged"], tps[NATIVE_MERGED]))
                cells = [f"{statistics.median(tps[NATIVE_MERGED]):.1f}, {up:.2f}x"]
            for k in kinds:  # cost = merged speed / this speed - 1, per round; median and range over rounds
                ref = tps[NATIVE_MERGED if k.startswith("native") and NATIVE_MERGED in tps else "merged"]
                cost = sorted(100 * (y / x - 1) for x, y in zip(tps[k], ref))
                cells.append(f"{statistics.median(tps[k]):.1f}, {statistics.median(cost):+.1f}% ({cost[0]:+.1f} to {cost[-1]:+.1f})")
            print(f"| {q} | {threads} | {statistics.median(tps['merged']):.1f} | " + " | ".join(cells) + " |", flush=True)
            del merged, branch, native, native8, native8a8, runs


if __name__ == "__main__":
    main()
