"""Peak resident memory, side by side in one run: lora-edge against llama.cpp, per extra adapter, one base + N adapters
against N merged models.

    python benchmarks/memory.py PKG                      # lora-edge rows only
    python benchmarks/memory.py PKG --merged MERGED_PKG --llama-python LLAMA_VENV/bin/python \\
        --gguf-q4 base-q4_0.gguf --gguf-lora pirate-f16.gguf
    python benchmarks/memory.py PKG --prompt-tokens 512 --new-tokens 16   # a long prompt: prefill's share of the peak

PKG: an int4 branch package with the adapter (default: pirate, as `scripts/demo.sh` exports it with --recipe portable);
MERGED_PKG: the same base with one adapter merged (`--mode merge`). Every row is a fresh subprocess on 1 thread (peak RSS
is its own VmHWM): it loads, encodes the same chat prompt ("What is snow?" through the package's chat template; with
--prompt-tokens N, the first N tokens of a text instead; llama.cpp gets the same token ids) and generates 128 tokens
greedily, forced to the full length.

Rows:
- "lora-edge": the package + the adapter. "lora-edge, pages kept": the same with the runtime's release of the pages
  loading read (the package's weights, the libraries' code, the C heap's free pages) and of the embedding rows
  after each call turned off (runtime/pages.py's `enabled`), for the saving and the decode speed side by side.
  "lora-edge, prompt in one call" (with --prompt-tokens): the prompt prefilled in one graph call instead of
  runtime/loop.py's chunks of PREFILL_CHUNK tokens.
- "llama.cpp Q4_0 + LoRA": llama-cpp-python (built as benchmarks/decode.py's docstring says) with the same adapter
  converted by llama.cpp's convert_lora_to_gguf.py (--outtype f16) and the base by convert_hf_to_gguf.py +
  llama_model_quantize (Q4_0).
- "llama.cpp, the package's GGUF + LoRA" (with --gguf-source): llama.cpp on the very GGUF the package was compiled
  from (the demo's is Q4_1: 20 bytes per 32 weights, as lora-edge's int4 blocks with offsets, against Q4_0's 18), to
  tell the weights' format from the runtime's own cost.
- "per extra adapter": RSS after loading N more copies of the adapter file (`model.load_adapter`), per copy, against
  the file's size.
- "base + N adapters vs N merged": one process with N adapters loaded generating with one of them, against N processes
  each running a merged package (N x the merged row's peak).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "What is snow?"

CHILD_LORA_EDGE = r"""
import json, os, sys, time
from pathlib import Path
pkg, adapter, new, keep, extra = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
total = sys.argv[6] == "total"  # extra counts every adapter loaded (the shipped ones too), not the copies
given = json.loads(sys.argv[7]) if len(sys.argv) > 7 else None  # the prompt's token ids (--prompt-tokens)
from lora_edge.runtime import pages, session
if keep:  # the runtime as it was before it released what loading and each call read
    pages.enabled = False
if sys.argv[4] == "2":  # the prompt prefilled in one call, as before the runtime chunked it
    from lora_edge.runtime import loop
    loop.PREFILL_CHUNK = 1 << 30
from lora_edge.profile.sandbox import peak_mib, resident_parts, rss_of
model = session.load(pkg, threads=1)
ids = given or model.tokenizer.encode(%r, True)
if total:  # every shipped adapter resident (the runtime reads one when first chosen)
    for name in model.adapters:
        model.check_adapter(name)
pages.after_loading()  # as each load_adapter ends: both ends of the per-adapter figure are measured alike
loaded = rss_of() / 2**20
extra = max(0, extra - len(model.adapters)) if total else extra
if extra:  # copies of the adapter's file loaded beside it
    path = Path(pkg) / model.manifest.adapter_files()[adapter]
    for i in range(extra):
        model.load_adapter(f"copy{i}", path)
    extra_mib = (rss_of() / 2**20 - loaded) / extra
    file_mib = path.stat().st_size / 2**20
else:
    extra_mib = file_mib = None
t = time.perf_counter()
out, _ = model.generate_ids(ids, adapter, max_new_tokens=new, min_new_tokens=new)
dt = time.perf_counter() - t
parts = resident_parts(pkg)
print(json.dumps({"peak_mib": peak_mib(), "loaded_mib": loaded, "tps": new / dt, "prompt_tokens": len(ids), "ids": ids,
                  "tokens": out[:16], "adapters": len(model.adapters), "extra_mib": extra_mib, "file_mib": file_mib, **parts}))
""" % PROMPT

CHILD_LLAMA_CPP = r"""
import importlib.util, json, sys, time
from pathlib import Path
import numpy as np
import llama_cpp
from llama_cpp import Llama
model, lora, new, ids = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), json.loads(sys.argv[4])
n_ctx = max(512, -(-(len(ids) + new) // 256) * 256)  # llama-cpp-python's default, or what the run needs
llm = Llama(model_path=model, lora_path=lora, n_threads=1, n_threads_batch=1, n_ctx=n_ctx, n_batch=512, logits_all=False,
            verbose=False)
last = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
t = time.perf_counter()
llm.eval(ids)
out = [int(np.argmax(last()))]
for _ in range(new - 1):
    llm.eval([out[-1]])
    out.append(int(np.argmax(last())))
dt = time.perf_counter() - t
# lora-edge's own accounting, loaded by path: sandbox.py needs only the standard library, this Python has no onnxruntime
spec = importlib.util.spec_from_file_location("sandbox", "lora_edge/profile/sandbox.py")
sandbox = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
parts = sandbox.resident_parts(Path(model).parent)  # "mapped": the files in the GGUF's folder
print(json.dumps({"peak_mib": sandbox.peak_mib(), "tps": new / dt, "tokens": out[:16], **parts}))
"""


def prompt_ids(package: str, text_file: Path, n: int) -> list[int]:
    """The first ``n`` tokens of ``text_file`` in the package's tokenizer (raw text, no chat template)."""
    from lora_edge.runtime.tokenizer import Tokenizer

    ids = Tokenizer(Path(package)).encode(text_file.read_text(), chat=False)
    if len(ids) < n:
        raise SystemExit(f"{text_file} has {len(ids)} tokens, fewer than --prompt-tokens {n}")
    return ids[:n]


def child(code: str, args: list[str], python: str = sys.executable) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", help="an int4 branch package holding the adapter")
    ap.add_argument("--adapter", default="pirate")
    ap.add_argument("--merged", default=None, help="the same base with one adapter merged (the 'N merged models' rows)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="instead of the chat prompt, the first N tokens of --prompt-file (a long prompt's prefill)")
    ap.add_argument("--prompt-file", type=Path, default=Path(__file__).parents[1] / "lora_edge" / "data" / "verify_text.txt")
    ap.add_argument("--rounds", type=int, default=3, help="every row this many times, round-robin; the median is reported")
    ap.add_argument("--extra", type=int, default=8, help="copies of the adapter loaded for the per-adapter row")
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8],
                    help="N for 'one base + N adapters vs N merged': adapters loaded, the package's own included")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python (enables the llama.cpp row)")
    ap.add_argument("--gguf-q4", default=None, help="the base as GGUF Q4_0")
    ap.add_argument("--gguf-lora", default=None, help="the adapter as a GGUF LoRA (convert_lora_to_gguf.py)")
    ap.add_argument("--gguf-source", default=None, help="the GGUF the package was compiled from (a second llama.cpp row)")
    args = ap.parse_args()
    new = str(args.new_tokens)
    given = json.dumps(prompt_ids(args.package, args.prompt_file, args.prompt_tokens) if args.prompt_tokens else None)

    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        rows.setdefault("lora-edge", []).append(child(CHILD_LORA_EDGE, [args.package, args.adapter, new, "0", "0", "copies", given]))
        rows.setdefault("lora-edge, pages kept", []).append(child(CHILD_LORA_EDGE, [args.package, args.adapter, new, "1", "0", "copies", given]))
        if args.prompt_tokens:
            rows.setdefault("lora-edge, prompt in one call", []).append(
                child(CHILD_LORA_EDGE, [args.package, args.adapter, new, "2", "0", "copies", given]))
        ids = json.dumps(rows["lora-edge"][0]["ids"])
        if args.llama_python and args.gguf_q4:
            rows.setdefault("llama.cpp Q4_0 + LoRA", []).append(
                child(CHILD_LLAMA_CPP, [args.gguf_q4, args.gguf_lora or "", new, ids], python=args.llama_python))
        if args.llama_python and args.gguf_source:
            rows.setdefault("llama.cpp, the package's GGUF + LoRA", []).append(
                child(CHILD_LLAMA_CPP, [args.gguf_source, args.gguf_lora or "", new, ids], python=args.llama_python))
        if args.merged:
            rows.setdefault("lora-edge merged", []).append(child(CHILD_LORA_EDGE, [args.merged, "", new, "0", "0", "copies", given]))
    extra = child(CHILD_LORA_EDGE, [args.package, args.adapter, new, "0", str(args.extra), "copies", given])
    with_n = {n: child(CHILD_LORA_EDGE, [args.package, args.adapter, new, "0", str(n), "total", given]) for n in args.counts}

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    first = rows["lora-edge"][0]
    what = f"the first tokens of {args.prompt_file.name}" if args.prompt_tokens else f"{PROMPT!r} in the chat template"
    print(f"prompt: {what} ({first['prompt_tokens']} tokens), {args.new_tokens} new tokens, 1 thread, "
          f"median of {args.rounds} fresh processes per row\n")
    print("| config | peak RSS MiB | vs llama.cpp | tok/s, prefill included | mapped weights MiB | heap MiB | libraries MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ref = med("llama.cpp Q4_0 + LoRA", "peak_mib") if "llama.cpp Q4_0 + LoRA" in rows else None
    for name in rows:
        peak = med(name, "peak_mib")
        parts = [f"{med(name, k):.1f}" if k in rows[name][0] else "-" for k in ("mapped", "anonymous", "libraries")]
        vs = f"{peak / ref:.3f}x" if ref else "-"
        print(f"| {name} | {peak:.1f} | {vs} | {med(name, 'tps'):.1f} | {' | '.join(parts)} |")
    kept = rows["lora-edge, pages kept"]
    speed = statistics.median(a["tps"] / b["tps"] for a, b in zip(rows["lora-edge"], kept))
    same = all(r["tokens"] == first["tokens"] for r in rows["lora-edge"] + kept)
    print(f"\ndecode speed, released / kept (median of per-round ratios): {speed:.3f}x; identical tokens: {same}")
    print(f"per extra loaded adapter: {extra['extra_mib']:.2f} MiB RSS, file {extra['file_mib']:.2f} MiB "
          f"({extra['extra_mib'] / extra['file_mib']:.2f}x its file; {args.extra} copies)")
    if args.merged:
        merged = med("lora-edge merged", "peak_mib")
        print("\n| adapters N | one base + N adapters, peak MiB | N merged models, peak MiB | saved |")
        print("| --- | --- | --- | --- |")
        for r in with_n.values():
            n = r["adapters"]
            print(f"| {n} | {r['peak_mib']:.0f} | {n * merged:.0f} | {100 * (1 - r['peak_mib'] / (n * merged)):.0f}% |")


if __name__ == "__main__":
    main()
