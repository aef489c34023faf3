"""Perplexity of lora-edge's recipes and of llama.cpp's GGUF types, same model, same adapter, same tokens.

    python benchmarks/ppl_vs_llamacpp.py --llama-python /tmp/llvenv/bin/python \
        --gguf f16=smol-f16.gguf q8_0=smol-q8_0.gguf q4_0=smol-q4_0.gguf q4_1=smol-q4_1.gguf --gguf-lora r16all-lora.gguf

What the speed table's llama.cpp ratios trade against. The text is lora-edge's 625-token verify
text, tokenized once by the package's tokenizer and fed as ids to both engines (one vocabulary);
the adapter is r16all, merged into the lora-edge packages that `decode.py` builds (same --work
folder) and applied by llama.cpp at run time. Perplexity is over every position of the one
sequence, from the full logits (accuracy level 4 for MatMulNBits; llama.cpp's own CPU kernels).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from decode import QUANTS, RECIPES, ROOT, build

CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
ids = json.loads(sys.argv[3])
llm = Llama(model_path=sys.argv[1], lora_path=sys.argv[2] or None, n_ctx=len(ids) + 8, n_batch=len(ids) + 8,
            logits_all=True, verbose=False, n_threads=2)
llm.eval(ids)
np.save(sys.stdout.buffer, np.asarray(llm.scores[: len(ids)], np.float32))
"""


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", nargs="*", default=[*QUANTS, "int8b32"], choices=list(RECIPES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-edge-bench"))
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed")
    ap.add_argument("--gguf", nargs="*", default=[], metavar="NAME=FILE", help="llama.cpp models to compare")
    ap.add_argument("--gguf-lora", default=None, help="r16all as a GGUF LoRA")
    args = ap.parse_args()
    if args.gguf and not args.llama_python:
        raise SystemExit("--gguf needs --llama-python: a Python with llama-cpp-python installed (see benchmarks/decode.py)")

    import lora_edge
    from lora_edge.compile.realmodel import smollm2_gguf

    pkgs = build(args.work, smollm2_gguf(), args.quants)
    rows = []
    ids = None
    for q in args.quants:
        m = lora_edge.load(pkgs[f"{q}-merged"], threads=2)
        if ids is None:
            ids = m.tokenizer.encode((ROOT / "lora_edge/data/verify_text.txt").read_text(), chat=False)
        rows.append((f"lora-edge {q}", perplexity(m.forward(np.asarray([ids]))[0], ids)))
    for spec in args.gguf:
        name, _, path = spec.partition("=")
        r = subprocess.run([args.llama_python, "-c", CHILD, path, args.gguf_lora or "", json.dumps(ids)], capture_output=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"llama.cpp child failed on {path}: {r.stderr.decode().strip().splitlines()[-1:]}")
        rows.append((f"llama.cpp {name}", perplexity(np.load(io.BytesIO(r.stdout)), ids)))
    ref = dict(rows).get("lora-edge fp32")
    print(f"\nSmolLM2-135M-Instruct + r16all, {len(ids)} tokens of lora_edge/data/verify_text.txt\n")
    print("| model | ppl | vs lora-edge fp32 |")
    print("|---|---|---|")
    for name, p in rows:
        print(f"| {name} | {p:.3f} | {f'{100 * (p / ref - 1):+.2f}%' if ref else '-'} |")


if __name__ == "__main__":
    main()
