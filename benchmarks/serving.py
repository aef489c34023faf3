"""Serving many users of one base: concurrent streams with different adapters against the same requests one after
another, on the real SmolLM2-135M-Instruct with the example adapters, side by side in one run.

    python benchmarks/serving.py                          # int4 (portable recipe), 2 threads, 1/2/4/8 streams
    python benchmarks/serving.py --threads 1 --tokens 48 --streams 1 4
    python benchmarks/serving.py --llama-python /work/llama-venv/bin/python --gguf q4_0.gguf \\
        --gguf-lora pirate=pirate.gguf --gguf-lora shout=shout.gguf      # llama.cpp's server beside it

Server figures come from a live `lora-edge serve` (a subprocess, --parallel 8) driven by the official `openai` client,
streaming: total tokens/s over all streams, and the gaps between a stream's chunks (per-token latency, p50/p95).
"one after another" sends the same requests to the same server, each after the last has finished. Every answer is
forced to --tokens tokens (the server's min_tokens, vLLM's extension), so the counts are equal.
In-process figures (no HTTP): one request with `generate_ids`, and a batch of 4 rows (runtime.batching) all with one
adapter against rows with 4 different choices (pirate, shout, the base, pirate at strength 0.5), the mixed-adapter cost.
llama.cpp is measured where llama-cpp-python with its [server] extra is installed (--llama-python, a python that
can import llama_cpp.server) and GGUFs are given (benchmarks/decode.py says how to make them): one model entry per
adapter (llama-cpp-python's server keeps one model loaded: a request for another alias reloads it), requests served
one at a time as that server does.
The client runs on the same cores as the server: the figures include what it costs, as they would on a device.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {n: ROOT / "examples" / "adapters" / n for n in ("pirate", "shout")}
QUESTIONS = ["What is snow?", "Why is the sea salty?", "Name three big cities.", "How do birds fly?",
             "What is a volcano?", "Why is the sky blue?", "What do cats eat?", "How are rainbows made?"]  # fmt: skip
CHOICES = ["pirate", "shout", None, "pirate"]  # stream i asks with CHOICES[i % 4]; None: the base


def build(work: Path) -> Path:
    out = work / "serving-int4"
    if not (out / "manifest.json").is_file():
        from lora_edge.compile.pipeline import export
        from lora_edge.config import AdapterSpec
        from lora_edge.recipes import export_config

        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import real_gguf

        export(export_config("portable", base=real_gguf(), output=out, adapters=tuple(AdapterSpec(n, p) for n, p in ADAPTERS.items()),
                             force=True), progress=print)  # fmt: skip
    return out


# -- in process ---------------------------------------------------------------------------------
def in_process(pkg: Path, threads: int, tokens: int, rounds: int) -> dict[str, float]:
    import lora_edge
    from lora_edge.runtime.batching import Row

    model = lora_edge.load(pkg, threads=threads)
    prompts = [model.tokenizer.encode(q, chat=True) for q in QUESTIONS[:4]]
    none = frozenset()

    def single() -> float:
        t = time.perf_counter()
        model.generate_ids(prompts[0], "pirate", tokens, tokens, eos_ids=none)
        return tokens / (time.perf_counter() - t)

    def batch_of(choices) -> float:
        batch = model.batch(len(choices), capacity=256)
        t = time.perf_counter()
        for p, c in zip(prompts, choices):
            batch.add(Row(p, model._adapters.key(c), tokens, eos_ids=none, min_new_tokens=tokens))
        while batch.rows:
            batch.step()
        return len(choices) * tokens / (time.perf_counter() - t)

    mixed = ["pirate", "shout", None, {"pirate": 0.5}]  # three stacked choices of rank 16, and a row of the base
    runs: dict[str, list[float]] = {"single": [], "same4": [], "mixed4": []}
    single(), batch_of(["pirate"] * 4), batch_of(mixed)  # warm: bindings, the bank
    for _ in range(rounds):  # round-robin: a noisy machine slows all three alike
        runs["single"].append(single())
        runs["same4"].append(batch_of(["pirate"] * 4))
        runs["mixed4"].append(batch_of(mixed))
    return {k: statistics.median(v) for k, v in runs.items()}


# -- over HTTP ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not start")


def stream(client, model: str, question: str, tokens: int, extra: dict) -> tuple[int, list[float], float]:
    """One streamed chat request: (completion tokens, gaps between chunks in s, seconds)."""
    start = time.perf_counter()
    stamps, usage = [], 0
    chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra)  # fmt: skip
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return usage or len(stamps), list(np.diff(stamps)), time.perf_counter() - start  # (a server without usage: a chunk a token)


def load_test(url: str, models: list[str], n: int, tokens: int, extra: dict, concurrent: bool) -> dict[str, float]:
    """``n`` streams (model i % len(models)), all at once or one after another."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    results: list = [None] * n

    def one(i: int) -> None:
        results[i] = stream(client, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], tokens, extra)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(n):
            one(i)
    wall = time.perf_counter() - start
    gaps = [g for _, gs, _ in results for g in gs]
    return {"tok_s": sum(u for u, _, _ in results) / wall, "p50_ms": 1000 * float(np.percentile(gaps, 50)),
            "p95_ms": 1000 * float(np.percentile(gaps, 95)), "tokens": sum(u for u, _, _ in results)}  # fmt: skip


def serve_lora_edge(pkg: Path, threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lora_edge.cli", "serve", str(pkg), "--port", str(port), "--threads", str(threads),
           "--parallel", str(parallel), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_up(url, proc)
    return proc, url


def serve_llama(python: str, gguf: Path, loras: dict[str, Path], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    models = [{"model": str(gguf), "model_alias": "base", "n_threads": threads, "n_ctx": 1024}]
    models += [{"model": str(gguf), "model_alias": name, "lora_path": str(path), "n_threads": threads, "n_ctx": 1024}
               for name, path in loras.items()]  # fmt: skip
    cfg = Path(tempfile.mkdtemp()) / "llama.json"
    cfg.write_text(json.dumps({"host": "127.0.0.1", "port": port, "models": models}))
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--config_file", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    wait_up(url, proc)
    return proc, url


def over_http(url: str, models: list[str], streams: list[int], tokens: int, extra: dict) -> dict[str, dict]:
    load_test(url, models, 2, 8, {k: min(v, 8) if k == "min_tokens" else v for k, v in extra.items()}, True)  # warm
    out = {}
    for n in streams:
        out[f"{n} at once"] = load_test(url, models, n, tokens, extra, True)
        out[f"{n} in turn"] = load_test(url, models, n, tokens, extra, False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, help="an int4 package with pirate and shout (default: exported into --work)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora-edge-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-python", help="a python with llama-cpp-python[server]")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--gguf-lora", action="append", default=[], metavar="NAME=PATH")
    args = ap.parse_args()
    pkg = args.package or build(args.work)
    print(f"package {pkg}, {args.threads} threads, {args.tokens} tokens per answer, {os.cpu_count()} cores")

    local = in_process(pkg, args.threads, args.tokens, args.rounds)
    proc, url = serve_lora_edge(pkg, args.threads, max(args.streams))
    try:
        models = [c or "base" for c in CHOICES]
        served = over_http(url, models, args.streams, args.tokens, {"min_tokens": args.tokens})
    finally:
        proc.terminate()
        proc.wait()
    llama = {}
    if args.llama_python and args.gguf:
        loras = dict((kv.split("=", 1)[0], Path(kv.split("=", 1)[1])) for kv in args.gguf_lora)
        proc, url = serve_llama(args.llama_python, args.gguf, loras, args.threads)
        try:
            no_end = {"logit_bias": {"0": -100, "2": -100}}  # (it takes no min_tokens: SmolLM2's end tokens barred instead)
            llama = over_http(url, [c if c in loras else "base" for c in models], args.streams, args.tokens, no_end)
        finally:
            proc.terminate()
            proc.wait()

    print("\nin process (tokens/s, median of rounds):")
    print(f"  one request {local['single']:.1f}; batch of 4, one adapter {local['same4']:.1f}; batch of 4, four choices "
          f"{local['mixed4']:.1f} -> mixed / same {local['mixed4'] / local['same4']:.2f}x")  # fmt: skip
    print("\nover HTTP, streaming (openai client):")
    print(f"  {'streams':<12} {'lora-edge tok/s':>16} {'p50 ms':>8} {'p95 ms':>8}" + (f" {'llama.cpp tok/s':>16} {'p95 ms':>8}" if llama else ""))
    for key, r in served.items():
        line = f"  {key:<12} {r['tok_s']:>16.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f}"
        if llama:
            line += f" {llama[key]['tok_s']:>16.1f} {llama[key]['p95_ms']:>8.1f}"
        print(line)
    one = served[f"{min(args.streams)} at once"]
    print("\nratios:")
    for n in args.streams:
        at_once, in_turn = served[f"{n} at once"], served[f"{n} in turn"]
        print(f"  {n} streams: at once / in turn {at_once['tok_s'] / in_turn['tok_s']:.2f}x tokens/s; "
              f"p95 / one stream's {at_once['p95_ms'] / one['p95_ms']:.2f}x")  # fmt: skip
    if 1 in args.streams:
        print(f"  server / in process, one stream: {served['1 at once']['tok_s'] / local['single']:.2f}x tokens/s")
    print(f"  mixed-adapter batch of 4 / same-adapter batch of 4: {local['mixed4'] / local['same4']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
