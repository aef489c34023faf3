"""The x86 side of scripts/arm64.sh: export the packages the arm64 root runs, and save what it compares against.

    python scripts/arm64_reference.py OUT [--light] [--reuse]

For each case, OUT/NAME/ holds the package (pkg/) and reference.npz: the token ids of a forward pass and a prompt,
and per adapter (and for none) this machine's logits of that forward pass (``x86.<a>``), its greedy tokens
(``greedy.<a>``) and PyTorch + PEFT's logits on the same weights (``torch.<a>``, the oracle). OUT/cases.json lists
the cases with their tolerances, and for quantized packages the verify-style figures the x86 package reaches against
PyTorch (lora_edge.compile.verify.compare_logits), which the arm64 run must stay within. scripts/arm64_check.py
(inside the root, no torch) reads them. ``--light``: the tiny model only; ``--reuse``: keep a case whose stamp (a
hash of lora_edge's sources and this file) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's tiny models, adapters, tolerances and the PEFT oracle

from conftest import ADAPTER_KINDS, FP32_TOL, QUESTION, REAL_ADAPTERS, REAL_TOL, Oracle, make_adapter, make_tiny_base  # noqa: E402

TINY_ADAPTERS = ("qv_r4", "all_r8_rslora")
GREEDY = {"tiny": 16, "real": 20}
FORWARD_TOKENS = {"tiny": 24, "real": 48}  # the real vocabulary is 49152 wide: 48 positions are 9 MB per array
# The real quantized package's figures are statistics over the text: 47 predictions left its Δppl to chance (the
# same package read -1.5% or +0.9% on two roundings of its activations), 127 settle KL and Δppl. ~2.5 min a pass
# under emulation.
QUANTIZED_REAL_TOKENS = 128


def cases(light: bool) -> list[dict]:
    """name, model (tiny | real), export options: the tiny model at fp32 / int8 / int4 (ONNX Runtime's default
    MatMulNBits with int8 activations, whose ARM kernels round them differently) and on the native kernel (w8a8
    branches on the int4 MatMulQ4 base: the NEON paths end to end); the real SmolLM2-135M at int4 and fp32."""
    out = [dict(name="tiny-fp32", model="tiny"), dict(name="tiny-int8", model="tiny", weights="int8"),
           dict(name="tiny-int4", model="tiny", weights="int4"),
           dict(name="tiny-int4-native", model="tiny", weights="int4", lora_kernel="native", lora_dtype="w8a8")]  # fmt: skip
    if not light:
        out += [dict(name="real-int4", model="real", weights="int4"), dict(name="real-fp32", model="real")]
    return out


def stamp(case: dict) -> str:
    h = hashlib.sha256(json.dumps(case, sort_keys=True).encode())
    for f in sorted((ROOT / "lora_edge").rglob("*")):
        if f.is_file() and f.suffix in (".py", ".txt", ".toml") and "__pycache__" not in f.parts:  # (the kernel is built apart)
            h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def export_case(case: dict, base: Path, adapters: dict[str, Path], out: Path) -> None:
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec, ExportConfig, QuantConfig, WeightType

    quant = QuantConfig(weights=WeightType(case["weights"])) if "weights" in case else QuantConfig()
    extra = {k: case[k] for k in ("lora_kernel", "lora_dtype") if k in case}
    export(ExportConfig(base=base, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in adapters.items()), quant=quant,
                        **extra))  # fmt: skip


def reference(case: dict, pkg: Path, oracle: Oracle, adapters: list[str]) -> tuple[dict, dict]:
    """The arrays of reference.npz, and the x86 package's verify-style figures per adapter (quantized cases)."""
    import lora_edge
    from lora_edge.compile.verify import compare_logits

    if case.get("lora_kernel") == "native":
        from lora_edge.native.build import build

        build()  # this machine's kernel (cached): the x86 run of the native package
    model = lora_edge.load(pkg)
    kind = case["model"]
    if kind == "tiny":
        ids = np.random.RandomState(7).randint(3, 320, FORWARD_TOKENS[kind]).astype(np.int64)
        prompt = [5, 17, 42, 99, 7]
    else:
        text = (ROOT / "lora_edge" / "data" / "verify_text.txt").read_text()
        n = QUANTIZED_REAL_TOKENS if "weights" in case else FORWARD_TOKENS[kind]
        ids = np.asarray(model.tokenizer.encode(text, chat=False)[:n], np.int64)
        prompt = model.tokenizer.encode(QUESTION, chat=True)
    arrays = {"ids": ids, "prompt": np.asarray(prompt, np.int64)}
    figures = {}
    for a in [None, *adapters]:
        key = a or "none"
        x86 = model.forward(ids[None], adapter=a)[0]
        want = oracle.logits(ids[None], a)[0]
        arrays[f"x86.{key}"], arrays[f"torch.{key}"] = x86.astype(np.float32), want.astype(np.float32)
        arrays[f"greedy.{key}"] = np.asarray(model.generate_ids(prompt, a, GREEDY[kind], GREEDY[kind])[0], np.int64)
        figures[key] = compare_logits(want, x86, ids, margin=0.5)
    return arrays, figures


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    out = Path(argv[0])
    light, reuse = "--light" in argv, "--reuse" in argv
    out.mkdir(parents=True, exist_ok=True)
    tiny_base = tiny_adapters = None
    listed = []
    for case in cases(light):
        where, st = out / case["name"], stamp(case)
        entry = {**case, "package": f"{case['name']}/pkg", "reference": f"{case['name']}/reference.npz",
                 "tol": FP32_TOL if case["model"] == "tiny" else REAL_TOL, "quantized": "weights" in case}  # fmt: skip
        done = where / "stamp.json"
        if reuse and done.is_file() and json.loads(done.read_text()).get("stamp") == st:
            listed.append(json.loads(done.read_text())["entry"])
            print(f"{case['name']}: reused", flush=True)
            continue
        if case["model"] == "tiny":
            if tiny_base is None:
                tiny_base = make_tiny_base(out / "_tiny" / "base")
                tiny_adapters = {n: make_adapter(tiny_base, out / "_tiny" / n, seed=i + 1, **ADAPTER_KINDS[n])
                                 for i, n in enumerate(TINY_ADAPTERS)}  # fmt: skip
            base, adapters = tiny_base, tiny_adapters
        else:
            from lora_edge.compile.realmodel import smollm2_gguf

            base, adapters = smollm2_gguf(), REAL_ADAPTERS
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        print(f"{case['name']}: exporting", flush=True)
        export_case(case, base, adapters, where / "pkg")
        arrays, figures = reference(case, where / "pkg", Oracle(base, adapters), list(adapters))
        np.savez(where / "reference.npz", **arrays)
        entry.update(adapters=list(adapters), x86_figures=figures)
        done.write_text(json.dumps({"stamp": st, "entry": entry}, indent=1))
        listed.append(entry)
        worst = max(abs(f["ppl_increase"]) for f in figures.values())
        print(f"{case['name']}: x86 max|Δppl| vs PyTorch {worst:.3f}%", flush=True)
    (out / "cases.json").write_text(json.dumps(listed, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
