"""The arm64 side of scripts/arm64.sh: run the packages exported on x86 (scripts/arm64_reference.py) and compare.

    python scripts/arm64_check.py CHECK_DIR [--kernel LIB ...]

Device side only (onnxruntime, numpy, tokenizers; no torch). Prints one PASS or FAIL line per check and exits 1 if any
failed. Per package and adapter (and for none):

- fp32: logits within the case's tolerance of the x86 run's (1e-4 tiny, 1e-3 real: float32 sums in another order),
  greedy tokens identical;
- int8 / int4: ONNX Runtime's ARM kernels round the int8 activations of MatMulNBits differently from its x86 ones, so
  logits are not compared with x86's; instead the verify figures against PyTorch + PEFT (lora_edge.compile.verify's
  compare_logits, numpy only) must stay within the x86 package's: KL at most KL_RATIO times the x86 package's, and
  |Δppl| at most the x86 package's plus PPL_SLACK;
- packages on the native kernel (its own int4 MatMulQ4, no MatMulNBits) also: logits within the tolerance of x86's;
- every package: adapters switch (each adapter's greedy answer differs from the others' and from no adapter's, and
  switching back gives identical tokens).

Packages on the native kernel run once per ``--kernel`` library (the NEON builds with and without SDOT and the
portable one), which must agree with each other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

# How much further from PyTorch than the x86 package the arm64 run may be. ARM's int8 activations are another rounding
# of the same values per block of weights: on the real int4 package its KL divergence is x86's within 15% (2.8e-3
# against 3.2e-3 without an adapter, 5.0e-3 against 4.8e-3 with pirate), while ONNX Runtime's KleidiAI kernels, which
# quantize a whole activation row at once, made it 5x (the runtime turns them off for such packages); a broken kernel
# or a lost adapter is orders of magnitude. KL is over every position and the whole vocabulary; Δppl over the text's
# tokens only moves more: on 127 predictions of the real text the same package moved by up to 1 point between the
# two roundings (pirate +1.75% on x86, +2.72% on ARM), on the tiny model's 23 by a few tenths.
KL_RATIO = 1.5
PPL_SLACK = {"tiny": 0.5, "real": 1.5}
# The native kernel's builds compute the same integer dot products; their float32 sums differ in order only, which can
# move one of the ranks' int8 codes by one step: relative to the logits' scale, well under this.
KERNEL_AGREEMENT = 1e-3

failed = 0


def report(ok: bool, what: str) -> None:
    global failed
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)


def switching(name: str, model, prompt: list[int], answers: dict, n: int) -> None:
    """``answers``: greedy tokens per adapter, generated in the order none, a1, a2, ... on one session; then a1 again.
    They differ by adapter, and a1 comes back identical."""
    first = list(answers)[1]
    again = model.generate_ids(prompt, first, n, n)[0] == answers[first]
    keys = list(answers)
    distinct = all(answers[a] != answers[b] for i, a in enumerate(keys) for b in keys[i + 1 :])
    report(distinct and again, f"{name}: adapters switch (answers differ by adapter: {distinct}; {first} again identical: {again})")


def check_case(case: dict, root: Path, model, label: str) -> dict:
    """The checks of one loaded package; returns its logits per adapter."""
    from lora_edge.compile.verify import compare_logits

    ref = np.load(root / case["reference"])
    ids, prompt = ref["ids"], ref["prompt"].tolist()
    n = len(ref["greedy.none"])
    got, answers = {}, {}
    for a in [None, *case["adapters"]]:
        key = a or "none"
        logits = model.forward(ids[None], adapter=a)[0]
        got[key] = logits
        x86 = ref[f"x86.{key}"]
        diff = float(np.abs(logits - x86).max())
        greedy = answers[a] = model.generate_ids(prompt, a, n, n)[0]
        same = int(np.argmin(np.append(np.asarray(greedy) == ref[f"greedy.{key}"], False)))  # identical prefix
        if not case["quantized"]:
            report(diff <= case["tol"] and same == n,
                   f"{label} [{key}]: max|logits - x86| {diff:.2e} <= {case['tol']:g}; greedy {same}/{n} identical")  # fmt: skip
            continue
        f, x = compare_logits(ref[f"torch.{key}"], logits, ids, margin=0.5), case["x86_figures"][key]
        bound, kl_bound = abs(x["ppl_increase"]) + PPL_SLACK[case["model"]], KL_RATIO * x["kl"]
        if case.get("lora_kernel") == "native":  # no MatMulNBits: the kernel's integer arithmetic is x86's exactly
            report(diff <= case["tol"], f"{label} [{key}]: max|logits - x86| {diff:.2e} <= {case['tol']:g}")
        report(abs(f["ppl_increase"]) <= bound and f["kl"] <= kl_bound,
               f"{label} [{key}]: KL vs PyTorch {f['kl']:.2e} (x86 {x['kl']:.2e}, bound {kl_bound:.2e}); "
               f"Δppl {f['ppl_increase']:+.3f}% (x86 {x['ppl_increase']:+.3f}%, bound ±{bound:.3f}); "
               f"top1 {f['top1']:.1f}% (x86 {x['top1']:.1f}%); max|logits - x86| {diff:.2e}; greedy {same}/{n} as on x86")  # fmt: skip
    switching(label, model, prompt, answers, n)
    if case["model"] == "real":
        for a, toks in answers.items():
            print(f"      {a or 'none'}: {model.tokenizer.decode(toks)!r}")
    return got


def main(argv: list[str]) -> int:
    import lora_edge

    root = Path(argv[0])
    kernels = [argv[i + 1] for i, x in enumerate(argv) if x == "--kernel"]
    for case in json.loads((root / "cases.json").read_text()):
        pkg = root / case["package"]
        if case.get("lora_kernel") != "native":
            check_case(case, root, lora_edge.load(pkg), case["name"])
            continue
        if not kernels:
            report(False, f"{case['name']}: a native-kernel package, and no --kernel given")
            continue
        runs = {}
        for lib in kernels:
            os.environ["LORA_EDGE_KERNEL_LIB"] = lib
            runs[lib] = check_case(case, root, lora_edge.load(pkg), f"{case['name']} on {Path(lib).name}")
        first = runs[kernels[0]]
        for lib in kernels[1:]:
            worst = max(float(np.abs(runs[lib][k] - first[k]).max() / np.abs(first[k]).max()) for k in first)
            report(worst <= KERNEL_AGREEMENT,
                   f"{case['name']}: {Path(lib).name} vs {Path(kernels[0]).name}: max relative |Δlogits| {worst:.1e} <= {KERNEL_AGREEMENT:g}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
