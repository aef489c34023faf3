"""Several prompts at once: one right-padded batch on the fused graph vs one prompt after another.

    python benchmarks/batch.py PKG [--threads 1 2] [--prompts 4] [--new-tokens 64]

Real prompts of different lengths (the chat template applied), forced to the same number of new
tokens; the figure is generated tokens per second over the whole set, best of 3, in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


PROMPTS = ["What is the capital of Italy?", "What is snow?", "Why is the sea salty? Answer in one sentence.",
           "Name three animals that live in the ocean and say one thing about each.", "Hi!",
           "Explain what a rainbow is to a child.", "What is 2 + 2?", "Write one sentence about pirates."]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--prompts", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapter", default=None)
    args = ap.parse_args()

    import lora_edge

    print("| threads | prompts | one by one tok/s | one batch tok/s | speed-up |\n|---|---|---|---|---|")
    for threads in args.threads:
        m = lora_edge.load(args.package, threads=threads)
        for n in args.prompts:
            ids = [m.tokenizer.encode(p, True) for p in PROMPTS[:n]]
            m.generate_ids_batch(ids[:2], args.adapter, 4, 4)  # warm-up
            seq = bat = 0.0
            for _ in range(3):
                t = time.perf_counter()
                for p in ids:
                    m.generate_ids(p, args.adapter, args.new_tokens, args.new_tokens)
                seq = max(seq, n * args.new_tokens / (time.perf_counter() - t))
                t = time.perf_counter()
                m.generate_ids_batch(ids, args.adapter, args.new_tokens, args.new_tokens)
                bat = max(bat, n * args.new_tokens / (time.perf_counter() - t))
            print(f"| {threads} | {n} | {seq:.1f} | {bat:.1f} | {bat / seq:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
