"""Soak: thousands of adapter switches and generations on one loaded model; does memory grow?

    python benchmarks/soak.py PACKAGE [--iterations 3000] [--threads 4]

Cycles no adapter and every adapter of PACKAGE, one short greedy generation each, from several
threads at once; prints resident memory (VmRSS) every 10% of the run. After the warm-up, growth
beyond allocator noise would be a leak.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path



def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=4)
    args = ap.parse_args()

    import lora_edge

    model = lora_edge.load(args.package, threads=1)
    choices = [None, *model.adapters]
    prompts = [[1000 + i, 2000 + i, 3000 + i, 4000 + i, 5000 + i] for i in range(7)]
    expected = {(a, i): model.generate_ids(p, a, args.new_tokens, args.new_tokens)[0] for a in choices for i, p in enumerate(prompts)}

    def job(k: int) -> bool:
        a, i = choices[k % len(choices)], k % len(prompts)
        return model.generate_ids(prompts[i], a, args.new_tokens, args.new_tokens)[0] == expected[(a, i)]

    start_rss, t0 = rss_mib(), time.perf_counter()
    samples, mismatches = [(0, start_rss)], 0
    step = max(1, args.iterations // 10)
    with ThreadPoolExecutor(args.threads) as pool:
        for begin in range(0, args.iterations, step):
            mismatches += sum(not ok for ok in pool.map(job, range(begin, min(begin + step, args.iterations))))
            samples.append((min(begin + step, args.iterations), rss_mib()))
    elapsed = time.perf_counter() - t0
    print(f"package {args.package}: {len(choices) - 1} adapters + none, {args.iterations} generations of {args.new_tokens} tokens "
          f"({args.iterations} adapter switches) on {args.threads} threads in {elapsed:.0f}s")  # fmt: skip
    print("iterations  VmRSS MiB")
    for n, r in samples:
        print(f"{n:>10}  {r:9.1f}")
    after_warmup = samples[1][1]
    print(f"growth after the first 10%: {samples[-1][1] - after_warmup:+.1f} MiB; outputs differing from the same call alone: {mismatches}")


if __name__ == "__main__":
    main()
