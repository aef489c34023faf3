"""Package size and `lora-edge verify` figures for every precision, branch and merge, on the real model.

    python benchmarks/quant_matrix.py [--out /tmp/lora-edge-matrix] [--variants NAME ...]

Exports SmolLM2-135M-Instruct with the example adapters (pirate, shout) at each precision and runs
verify (the shipped 625-token text, 32 greedy tokens) against PyTorch + PEFT; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from lora_edge.config import AdapterSpec, ExportConfig, Mode, QuantConfig, WeightType  # noqa: E402

W = WeightType
VARIANTS = {
    "fp32": dict(quant=QuantConfig()),
    "fp16": dict(quant=QuantConfig(weights=W.FP16)),
    "int8": dict(quant=QuantConfig(weights=W.INT8)),
    "int8 b32 sym": dict(quant=QuantConfig(weights=W.INT8, block_size=32, zero="none")),  # llama.cpp Q8_0's format
    "int4 (emb int8)": dict(quant=QuantConfig(weights=W.INT4)),
    "int4 (emb int4)": dict(quant=QuantConfig(weights=W.INT4, embeddings=W.INT4)),
    "merge pirate int4": dict(quant=QuantConfig(weights=W.INT4), mode=Mode.MERGE, only="pirate"),
    "merge shout int8": dict(quant=QuantConfig(weights=W.INT8), mode=Mode.MERGE, only="shout"),
}
ADAPTERS = {"pirate": ROOT / "examples/adapters/pirate", "shout": ROOT / "examples/adapters/shout"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lora-edge-matrix"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()

    from lora_edge.compile.pipeline import export
    from lora_edge.compile.realmodel import smollm2_gguf
    from lora_edge.compile.verify import VerifyConfig, verify

    base = smollm2_gguf()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| package | model files MiB | % of fp32 | adapter | max abs dlogit | KL | top-1 % (clear) | ppl | dppl % | effect cos / norm | greedy 32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fp32_size = None
    for name in args.variants:
        v = VARIANTS[name]
        out = args.out / name.replace(" ", "_").replace("(", "").replace(")", "")
        if out.exists():
            shutil.rmtree(out)
        names = [v["only"]] if "only" in v else list(ADAPTERS)
        t = time.perf_counter()
        res = export(ExportConfig(base=base, output=out, adapters=tuple(AdapterSpec(n, ADAPTERS[n]) for n in names),
                                  mode=v.get("mode", Mode.BRANCH), quant=v["quant"]))  # fmt: skip
        t_export = time.perf_counter() - t
        size = res.manifest.size("model.onnx")
        fp32_size = fp32_size or (size if name == "fp32" else None)
        rep = verify(VerifyConfig(package=out))
        for r in rep.results:
            eff = f"{r.effect_cosine:.3f} / {r.effect_norm_ratio:.3f}" if r.effect_cosine is not None else "-"
            pct = f"{100 * size / fp32_size:.1f}" if fp32_size else "-"
            print(f"| {name} | {size / 2**20:.1f} | {pct} | {r.adapter or 'none'} | {r.max_abs_diff:.2e} | {r.kl:.2e} | "
                  f"{r.top1:.1f} ({r.top1_clear:.1f}) | {r.ppl_package:.3f} | {r.ppl_increase:+.2f} | {eff} | "
                  f"{r.greedy_prefix}/{r.greedy_tokens} |", flush=True)  # fmt: skip
        print(f"<!-- {name}: export {t_export:.0f}s -->", flush=True)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
