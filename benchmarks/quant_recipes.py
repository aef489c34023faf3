"""Compare quantization recipes on the real SmolLM2-135M-Instruct: perplexity, top-1, size.

    python benchmarks/quant_recipes.py [--recipes NAME ...]

Fast path: the weights are quantized with lora-edge's own quantizer and dequantized back into the
PyTorch model ("fake quant"). tests/test_quant.py proves a package at accuracy level 0 computes
exactly these weights (1e-4), so the figures are the package's, minus the int8-activation
rounding of accuracy level 4 (measured separately by `lora-edge verify`).
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np


from lora_edge.config import QuantConfig, WeightType  # noqa: E402

I4, I8 = WeightType.INT4, WeightType.INT8
S = dict(algo="search", zero="int")
RECIPES = {
    "int8": QuantConfig(weights=I8, **S),
    "int4-rtn-emb8": QuantConfig(weights=I4, algo="rtn"),
    "int4-search-emb8": QuantConfig(weights=I4, **S),
    "int4-search-emb4": QuantConfig(weights=I4, embeddings=I4, **S),
    "int4-search-b16-emb8": QuantConfig(weights=I4, block_size=16, **S),
    "int4-search-sym-emb8": QuantConfig(weights=I4, algo="search", zero="none"),
    "int4-search-emb8-down8": QuantConfig(weights=I4, int8_modules=("down_proj",), **S),
    "int4-search-emb8-v8-down8": QuantConfig(weights=I4, int8_modules=("v_proj", "down_proj"), **S),
    "int4-search-emb8-attn8": QuantConfig(weights=I4, int8_modules=("q_proj", "k_proj", "v_proj", "o_proj"), **S),
    "int4-search-emb8-mlp8": QuantConfig(weights=I4, int8_modules=("gate_proj", "up_proj", "down_proj"), **S),
    "int4-gptq-emb8": QuantConfig(weights=I4, zero="int"),
    "int4-gptq-emb8-kv8": QuantConfig(weights=I4, zero="int", int8_modules=("k_proj", "v_proj")),
    "int4f-rtn-emb8": QuantConfig(weights=I4, zero="float", algo="rtn"),
    "int4f-search-emb8": QuantConfig(weights=I4, zero="float", algo="search"),
    "int4f-gptq-emb8": QuantConfig(weights=I4, zero="float"),
    "int4f-gptq-emb4": QuantConfig(weights=I4, zero="float", embeddings=I4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = ap.parse_args()

    import torch

    from lora_edge.compile.models.loader import load_base, load_hf_model
    from lora_edge.compile.quant.blocks import QTensor, dequantize, quantize_weights
    from lora_edge.compile.realmodel import smollm2_gguf
    from lora_edge.compile.verify import compare_logits

    torch.set_num_threads(2)
    gguf = smollm2_gguf()
    base, model = load_base(gguf)
    from tokenizers import Tokenizer

    from lora_edge.compile.models.gguf_tokenizer import tokenizer_files_from_gguf

    tok = Tokenizer.from_str(tokenizer_files_from_gguf(gguf)["tokenizer.json"].decode())
    text = resources.files("lora_edge").joinpath("data/verify_text.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x).logits[0].numpy()
    fp32_bytes = sum(w.size * 4 for w in base.weights.values())
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens; fp32 weights {fp32_bytes / 2**20:.1f} MiB")
    print(f"{'recipe':<22}{'MiB':>8}{'% fp32':>8}{'ppl':>9}{'Δppl%':>8}{'top1%':>7}{'clear%':>8}{'KL':>9}{'s':>6}")
    hessians = None
    for name in args.recipes:
        t = time.perf_counter()
        if RECIPES[name].algo == "gptq" and hessians is None:
            from lora_edge.calibrate import collect_hessians, default_calibration_text

            calib = tok.encode(default_calibration_text(), add_special_tokens=False).ids
            hessians = collect_hessians(model, calib, list(base.linear_modules))
        qw, _, _ = quantize_weights(base.weights, base.linear_modules, RECIPES[name], hessians=hessians)
        size = sum(v.nbytes for v in qw.values())
        m = load_hf_model(gguf)
        sd = {k: torch.tensor(dequantize(v) if isinstance(v, QTensor) else np.asarray(v, np.float32)) for k, v in qw.items()}
        m.load_state_dict(sd, strict=False)
        with torch.no_grad():
            got = m(x).logits[0].numpy()
        f = compare_logits(ref, got, np.asarray(ids), 0.5)
        print(f"{name:<22}{size / 2**20:>8.1f}{100 * size / fp32_bytes:>8.1f}{f['ppl_package']:>9.3f}{f['ppl_increase']:>+8.2f}"
              f"{f['top1']:>7.1f}{f['top1_clear']:>8.1f}{f['kl']:>9.4f}{time.perf_counter() - t:>6.0f}", flush=True)  # fmt: skip
        del m


if __name__ == "__main__":
    main()
