"""Decode speed, prefill speed, time to first token and peak memory, side by side in one run.

    python benchmarks/decode.py                       # threads 1 and 2, 128-token prompt, 128 new tokens
    python benchmarks/decode.py --threads 1 --new-tokens 64 --configs fp32-merged int4-branch torch
    python benchmarks/decode.py --runs 1 --rounds 3   # on a noisy machine: every config 3 times, round-robin

Real SmolLM2-135M-Instruct. The adapter is "r16all": rank 16 on every attention and MLP
projection (made with PEFT, seeded; its values do not matter for speed), plus the two example
adapters loaded beside it in branch packages. Per recipe: "-merged" (r16all folded in), "-branch"
(r16all as standard-MatMul branches), "-native" (the same branches on lora-edge's LoraDelta kernel,
`--lora-kernel native`, float16 A/B), "-native8" (`--lora-dtype int8`: int8 A/B), "-native8a8"
(`--lora-dtype w8a8`: int8 A/B in the q8x order, int8 activations; `--no-native` leaves the three out)
and "-none" (the branch package, no adapter). Each measurement runs in a fresh subprocess
(peak RSS is that process's VmHWM). Decode time excludes the prompt pass; generation is forced to the
full length (min_new_tokens). Compare ratios within one run: this machine is shared and noisy.

llama.cpp is measured when llama-cpp-python is installed (`pip install llama-cpp-python`) and
GGUF files are given with --gguf-q8 / --gguf-q4 / --gguf-q41 / --gguf-lora / --gguf-lora-q8 (convert with llama.cpp's
convert_hf_to_gguf.py and convert_lora_to_gguf.py); it is not a test dependency. How it was done here
(llama-cpp-python 0.3.36, in its own venv; its sdist carries vendor/llama.cpp with both scripts):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
      -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" pip install llama-cpp-python
    (GGML_NATIVE=ON built AMX kernels that died with "Illegal instruction" on one VM and segfaulted at the first
    eval on another; name the ISA the CPU has, `grep -o 'avx512[a-z_]*' /proc/cpuinfo`: AVX-512 ON where the CPU
    lacks it dies the same way. On an AVX-512 host: -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
    -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON, AMX still OFF)
    save the float base as an HF folder: load_hf_model(smollm2_gguf()), then (transformers refuses to save a
    GGUF-loaded model) AutoModelForCausalLM.from_config(config without quantization_config) + load_state_dict
    + save_pretrained, and AutoTokenizer.from_pretrained(dir, gguf_file=...).save_pretrained; then
    convert_hf_to_gguf.py BASE --outtype f16; llama_cpp.llama_model_quantize(..., LLAMA_FTYPE_MOSTLY_Q8_0 / Q4_0 / Q4_1)
    convert_lora_to_gguf.py WORK/r16all --base BASE --outtype f16   (and --outtype q8_0 for --gguf-lora-q8:
    llama.cpp quantizes A to q8_0 and keeps B, whose rows of 16 make no block of 32, in f16)

Two llama.cpp ratio columns: "same bits" against Q8_0 / Q4_0 (what the target names), and "same format"
against the GGUF type that stores what the lora-edge recipe stores: int4 (4-bit codes, a scale and a
float offset per block of 32) against Q4_1; int8b32 (`--quants ... int8b32`: 8-bit, one scale per block
of 32, no zero point, activations quantized per 32, which is Q8_0's own layout) against Q8_0; int4sym
(`--quants ... int4sym`: 4-bit, one scale per block of 32, Q4_0's layout) against Q4_0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"pirate": ROOT / "examples/adapters/pirate", "shout": ROOT / "examples/adapters/shout"}
QUANTS = ("fp32", "int8", "int4")  # the default recipes
# int8b32: int8 in llama.cpp Q8_0's own format (blocks of 32, one scale, no zero point; the activations
# quantized per block of 32 as Q8_0 does), the like-for-like twin of Q8_0 (the default int8 recipe's
# block 16 with zero points keeps more accuracy and reads 25% more bytes)
# int4sym: int4 in Q4_0's own format (blocks of 32, one scale, no zero point or offset), its like-for-like twin
# (the default int4's float offsets cost a small correction matmul and buy Q4_1's accuracy)
RECIPES = {"fp32": {}, "int8": {"weights": "int8"}, "int4": {"weights": "int4"},
           "int8b32": {"weights": "int8", "block_size": 32, "zero": "none"},
           "int4sym": {"weights": "int4", "block_size": 32, "zero": "none"}}  # fmt: skip


NATIVE_DTYPES = {"native": "float16", "native8": "int8", "native8a8": "w8a8"}  # packages on lora-edge's kernel: their A/B
NATIVE_KINDS = tuple(NATIVE_DTYPES)
# the merged package on lora-edge's kernel, for recipes with float block offsets (int4): MatMulQ4 runs each
# projection (kernel v4; BlockOffset the correction at accuracy levels below 4); the native branch rows' cost
# is measured against it (the same graph less the adapter)
NATIVE_MERGED = "nativemerged"
UNMERGED_KINDS = ("branch", *NATIVE_KINDS)  # rows that run r16all as a branch
LORA_GGUF = {"lora": "gguf_lora", "lora8": "gguf_lora_q8"}  # llama.cpp row kind -> the argument naming its GGUF LoRA


def make_r16(path: Path, base: Path) -> Path:
    if (path / "adapter_model.safetensors").is_file():
        return path
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_edge.compile.models.loader import load_hf_model

    torch.manual_seed(0)
    model = get_peft_model(load_hf_model(base), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.01)  # a realistic-size update; speed does not depend on it
    model.save_pretrained(path)
    return path


def recipe(q: str):
    from lora_edge.config import QuantConfig, WeightType

    return QuantConfig(**{k: WeightType(v) if k == "weights" else v for k, v in RECIPES[q].items()})


def kinds_of(q: str, native: bool) -> tuple[str, ...]:
    """The package kinds built for recipe ``q``."""
    extra = NATIVE_KINDS + ((NATIVE_MERGED,) if recipe(q).kernel_base_work else ()) if native else ()
    return ("branch", "merged", *extra)


def build(work: Path, base: Path, quants=QUANTS, native: bool = False) -> dict[str, Path]:
    """The packages of each recipe: "-merged" (r16all folded in), "-branch" (r16all and the example adapters
    as branches, standard MatMuls) and, with ``native``, "-native" (the same branches on lora-edge's
    LoraDelta kernel, float16 A/B; the kernel is built first), "-native8" (int8 A/B, LoraDeltaQ8), "-native8a8"
    (w8a8: the same in the q8x order, int8 activations) and, for
    recipes whose base the kernel runs (int4 at block 32, float offsets or symmetric), "-nativemerged" (merged, the
    int4 product on the kernel)."""
    from lora_edge.config import AdapterSpec, ExportConfig, Mode
    from lora_edge.compile.pipeline import export

    if native:
        from lora_edge.native.build import build as build_kernel

        build_kernel(progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    r16 = make_r16(work / "r16all", base)
    pkgs = {}
    for q in quants:
        qcfg = recipe(q)
        for mode in kinds_of(q, native):
            out = work / f"{q}-{mode}"
            merged = mode in ("merged", NATIVE_MERGED)
            if not (out / "manifest.json").is_file():
                specs = (AdapterSpec("r16all", r16),) + (tuple(AdapterSpec(n, p) for n, p in ADAPTERS.items()) if not merged else ())
                print(f"exporting {out.name}", file=sys.stderr, flush=True)
                export(ExportConfig(base=base, output=out, adapters=specs, quant=qcfg, mode=Mode.MERGE if merged else Mode.BRANCH,
                                    lora_kernel="native" if mode.startswith("native") else "onnx",
                                    lora_dtype=NATIVE_DTYPES.get(mode, "float16")))  # fmt: skip
            pkgs[f"{q}-{mode}"] = out
    return pkgs


CHILD_LORA_EDGE = r"""
import json, resource, sys, time
import numpy as np
import lora_edge
pkg, adapter, threads, n_prompt, n_new = sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
t0 = time.perf_counter()
m = lora_edge.load(pkg, threads=threads)
load_s = time.perf_counter() - t0
words = m.tokenizer.encode(open(sys.argv[7]).read(), chat=False)
prompt = (words * (n_prompt // len(words) + 1))[:n_prompt]
m.generate_ids(prompt[:16], adapter, 4, 4)  # warm-up
runs = []
for _ in range(int(sys.argv[8])):
    times = []
    start = time.perf_counter()
    m.generate_ids(prompt, adapter, n_new, n_new, on_token=lambda t: times.append(time.perf_counter()))
    ttft = times[0] - start
    runs.append({"ttft_s": ttft, "prefill_tps": n_prompt / ttft, "decode_tps": (n_new - 1) / (times[-1] - times[0])})
best = max(runs, key=lambda r: r["decode_tps"])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]  # ru_maxrss survives exec; VmHWM does not
print(json.dumps({**best, "load_s": load_s, "peak_rss_mib": int(hwm) / 1024}))
"""

CHILD_TORCH = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from peft import PeftModel
from lora_edge.compile.models.loader import load_hf_model
from lora_edge.compile.models.gguf_tokenizer import tokenizer_files_from_gguf
from tokenizers import Tokenizer
base, adapter, threads, n_prompt, n_new = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
t0 = time.perf_counter()
model = PeftModel.from_pretrained(load_hf_model(__import__("pathlib").Path(base)), adapter).eval()
load_s = time.perf_counter() - t0
tok = Tokenizer.from_str(tokenizer_files_from_gguf(base)["tokenizer.json"].decode())
words = tok.encode(open(sys.argv[7]).read(), add_special_tokens=False).ids
prompt = torch.tensor([(words * (n_prompt // len(words) + 1))[:n_prompt]])
runs = []
with torch.no_grad():
    model(prompt[:, :16])  # warm-up
    for _ in range(int(sys.argv[8])):
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(n_new - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        runs.append({"ttft_s": t1 - start, "prefill_tps": n_prompt / (t1 - start), "decode_tps": (n_new - 1) / (t2 - t1)})
best = max(runs, key=lambda r: r["decode_tps"])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]  # ru_maxrss survives exec; VmHWM does not
print(json.dumps({**best, "load_s": load_s, "peak_rss_mib": int(hwm) / 1024}))
"""


CHILD_LLAMA_CPP = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
model, lora, threads, n_prompt, n_new = sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
t0 = time.perf_counter()
llm = Llama(model_path=model, lora_path=lora, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
            logits_all=False, verbose=False)
load_s = time.perf_counter() - t0
words = llm.tokenize(open(sys.argv[7], "rb").read(), add_bos=False)
prompt = (words * (n_prompt // len(words) + 1))[:n_prompt]
# llama-cpp-python >= 0.3 leaves llm.scores at zero without logits_all (which would copy every row and
# slow the prefill): read the last row of the context's logits instead
last_logits = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
runs = []
for _ in range(int(sys.argv[8]) + 1):  # the first run is the warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    nxt = int(np.argmax(last_logits()))
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([nxt])
        nxt = int(np.argmax(last_logits()))
    t2 = time.perf_counter()
    runs.append({"ttft_s": t1 - start, "prefill_tps": n_prompt / (t1 - start), "decode_tps": (n_new - 1) / (t2 - t1)})
best = max(runs[1:], key=lambda r: r["decode_tps"])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({**best, "load_s": load_s, "peak_rss_mib": int(hwm) / 1024}))
"""


def run_child(code: str, args: list[str], python: str = sys.executable) -> dict:
    r = subprocess.run([python, "-c", code, str(ROOT), *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "child failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--quants", nargs="*", default=list(QUANTS), choices=list(RECIPES), help="lora-edge recipes to run")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, help="measured runs per configuration and process (the best is reported)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole set of configurations this many times, round-robin: tok/s columns are each one's best, "
                         "ratio columns the median of the ratios within each round")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-edge-bench"))
    ap.add_argument("--configs", nargs="*", default=None,
                    help="subset of: torch, fp32-merged, fp32-branch, fp32-native, fp32-none, int8-..., int8b32-..., int4-..., "
                         "llamacpp-q8-none, llamacpp-q8-lora, llamacpp-q4-..., llamacpp-q41-...")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--no-native", action="store_true", help="leave out the -native rows (--lora-kernel native: needs a C++ compiler)")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed (enables llama.cpp rows)")
    ap.add_argument("--gguf-q8", default=None, help="the model as GGUF Q8_0 (convert_hf_to_gguf.py + llama_model_quantize)")
    ap.add_argument("--gguf-q4", default=None, help="the model as GGUF Q4_0")
    ap.add_argument("--gguf-q41", default=None, help="the model as GGUF Q4_1 (block scale and offset: int4's own format)")
    ap.add_argument("--gguf-lora", default=None, help="r16all as a GGUF LoRA (convert_lora_to_gguf.py)")
    ap.add_argument("--gguf-lora-q8", default=None,
                    help="r16all as a GGUF LoRA in q8_0 (--outtype q8_0): the -native8 rows' llama.cpp comparison")
    args = ap.parse_args()

    from lora_edge.compile.realmodel import smollm2_gguf

    base = smollm2_gguf()
    args.work.mkdir(parents=True, exist_ok=True)
    order = ("merged", NATIVE_MERGED, "branch", *NATIVE_KINDS)
    configs = args.configs or ["torch"] + [f"{q}-{k}" for q in args.quants
                                           for k in (*sorted(kinds_of(q, not args.no_native), key=order.index), "none")]  # fmt: skip
    if args.llama_python and not args.configs:
        configs += [f"llamacpp-{q}-{k}" for q in ("q8", "q4", "q41") if getattr(args, f"gguf_{q}")
                    for k in ("none", *LORA_GGUF) if k == "none" or getattr(args, LORA_GGUF[k])]  # fmt: skip
    for c in configs:  # a missing file or interpreter: say so now, not after an hour of measuring
        if c.startswith("llamacpp-"):
            _, q, kind = c.split("-")
            needs = [("--llama-python", args.llama_python), (f"--gguf-{q}", getattr(args, f"gguf_{q}", None))]
            if kind in LORA_GGUF:
                needs.append(("--" + LORA_GGUF[kind].replace("_", "-"), getattr(args, LORA_GGUF[kind])))
            if missing := [flag for flag, value in needs if not value]:
                raise SystemExit(f"{c} needs {' and '.join(missing)}")
    pkgs = build(args.work, base, [q for q in RECIPES if q in args.quants or any(c.startswith(f"{q}-") for c in configs)],
                 native=any(c.rsplit("-", 1)[-1] in (*NATIVE_KINDS, NATIVE_MERGED) for c in configs))  # fmt: skip
    text = ROOT / "lora_edge/data/verify_text.txt"
    best: dict[tuple[str, int], dict] = {}
    per_round: dict[tuple[str, int, int], float] = {}  # (config, threads, round) -> decode tok/s
    # round-robin: a slow spell of the machine hits every configuration alike
    for rnd, threads, c in ((r, t, c) for r in range(args.rounds) for t in args.threads for c in configs):
        common = [str(threads), str(args.prompt_tokens), str(args.new_tokens), str(text), str(args.runs)]
        if c == "torch":
            fig = run_child(CHILD_TORCH, [str(base), str(args.work / "r16all"), *common])
        elif c.startswith("llamacpp-"):
            _, q, kind = c.split("-")
            gguf = getattr(args, f"gguf_{q}")
            lora = getattr(args, LORA_GGUF[kind]) if kind in LORA_GGUF else ""
            fig = run_child(CHILD_LLAMA_CPP, [gguf, lora, *common], python=args.llama_python)
        else:
            q, kind = c.split("-")
            pkg = pkgs[f"{q}-{kind if kind in ('merged', *NATIVE_KINDS, NATIVE_MERGED) else 'branch'}"]
            fig = run_child(CHILD_LORA_EDGE, [str(pkg), "r16all" if kind in UNMERGED_KINDS else "", *common])
        row = {"config": c, "threads": threads, "round": rnd, **fig}
        print(json.dumps(row), file=sys.stderr, flush=True)
        per_round[c, threads, rnd] = fig["decode_tps"]
        if (c, threads) not in best or fig["decode_tps"] > best[c, threads]["decode_tps"]:
            best[c, threads] = row
    rows = [best[c, t] for t in args.threads for c in configs]

    def ratio(a: str, b: str, threads: int) -> float | None:
        """Speed of a over b: the median over rounds of the ratio within each round (two rows of one round
        run close together in time; the best-of figures of two rows may come from different rounds)."""
        pairs = [per_round[a, threads, r] / per_round[b, threads, r] for r in range(args.rounds)
                 if (a, threads, r) in per_round and (b, threads, r) in per_round]  # fmt: skip
        return statistics.median(pairs) if pairs else None

    print(f"\nSmolLM2-135M-Instruct, adapter r16all (rank 16, all 7 projections); prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens forced; tok/s: best of {args.runs} runs x {args.rounds} rounds; "
          f"ratios: median over rounds of the ratio within a round\n")  # fmt: skip
    print("| config | threads | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB | decode vs torch | vs llama.cpp same bits "
          "| vs llama.cpp same format | branch cost vs merged |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")

    def fmt(x: float | None) -> str:
        return f"{x:.2f}x" if x else "-"

    for r in rows:
        c, t = r["config"], r["threads"]
        vs = ratio(c, "torch", t)
        cost = "-"
        unmerged = c.rsplit("-", 1)[-1] in UNMERGED_KINDS
        merged = f"{c.split('-')[0]}-{NATIVE_MERGED if c.endswith(NATIVE_KINDS) else 'merged'}"  # (the same kernel, less the adapter)
        if unmerged and (x := ratio(merged if merged in configs else f"{c.split('-')[0]}-merged", c, t)):
            cost = f"{100 * (x - 1):+.1f}%"
        if c.endswith(("-lora", "-lora8")) and (x := ratio(c.rsplit("-", 1)[0] + "-none", c, t)):
            cost = f"{100 * (x - 1):+.1f}% (vs no LoRA)"
        q, kind = c.split("-")[0], "lora" if unmerged else "none"
        if c.endswith(("-native8", "-native8a8")) and args.gguf_lora_q8:  # int8 A/B: against llama.cpp's q8_0 LoRA
            kind = "lora8"
        # same bits: Q8_0 / Q4_0, as the issue asks; same format: the GGUF type that stores what the recipe stores
        # (int4: 4-bit codes, a scale and an offset per 32 = Q4_1; int8b32: 8-bit, one scale per 32 = Q8_0;
        # int4sym: 4-bit, one scale per 32 = Q4_0)
        same_bits = {"int8": "q8", "int8b32": "q8", "int4": "q4", "int4sym": "q4"}.get(q)
        same_fmt = {"int8b32": "q8", "int4": "q41", "int4sym": "q4"}.get(q)
        vs_bits = ratio(c, f"llamacpp-{same_bits}-{kind}", t) if same_bits else None
        vs_fmt = ratio(c, f"llamacpp-{same_fmt}-{kind}", t) if same_fmt else None
        print(f"| {c} | {t} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {1000 * r['ttft_s']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{fmt(vs)} | {fmt(vs_bits)} | {fmt(vs_fmt)} | {cost} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
