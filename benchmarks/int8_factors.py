"""Where int8 loses perplexity, one factor at a time, on the real SmolLM2-135M-Instruct and its adapters.

    python benchmarks/int8_factors.py                                   # the table in docs/quantization.md
    python benchmarks/int8_factors.py --weights int:16 float:32 --act-blocks 16 32 --rounded all lm_head down_proj

The weights are quantized with lora-edge's own quantizer and dequantized back into PyTorch + PEFT (tests prove a
package at accuracy level 0 computes exactly these weights). Accuracy level 4's activation rounding is applied
to the inputs of the chosen projections: per block of K, to 1/127 of the block's largest magnitude, which is
what ONNX Runtime's MatMulNBits computes at level 4 (to 5e-7 on a single node). The LoRA branches keep float
inputs, as in the package. Figures are verify's (compare_logits) against float32 PyTorch + PEFT on verify's text.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {n: ROOT / "examples" / "adapters" / n for n in ("pirate", "shout", "robot")}
SUBSETS = {"all": None, "attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="*", default=["int:16", "float:32", "float:16"], help="ZERO:BLOCK of the int8 weights")
    ap.add_argument("--act-blocks", type=int, nargs="*", default=[16, 32], help="activation rounding blocks (0: none)")
    ap.add_argument("--rounded", nargs="*", default=["all", "lm_head"],
                    help="whose inputs are rounded: all, attn, mlp, or projection names (lm_head, down_proj, ...)")
    ap.add_argument("--adapters", nargs="*", default=list(ADAPTERS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from peft import PeftModel

    from lora_edge.compile.models.gguf_tokenizer import tokenizer_files_from_gguf
    from lora_edge.compile.models.loader import load_base
    from lora_edge.compile.quant.blocks import QTensor, dequantize, quantize_weights
    from lora_edge.compile.realmodel import smollm2_gguf
    from lora_edge.compile.verify import compare_logits
    from lora_edge.config import QuantConfig, WeightType
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    base, model = load_base(gguf)
    tok = Tokenizer.from_str(tokenizer_files_from_gguf(gguf)["tokenizer.json"].decode())
    ids = np.asarray(tok.encode(resources.files("lora_edge").joinpath("data/verify_text.txt").read_text(),
                                add_special_tokens=False).ids[:1024])  # fmt: skip
    x = torch.tensor(ids[None])
    linears = {m: model.get_submodule(m) for m in base.linear_modules}
    linears.setdefault("lm_head", model.lm_head)  # tied: the embedding's weight, quantized with it

    rounded: dict = {"block": 0, "who": ()}

    def round_input(mod, inputs):  # (..., K) -> the same, each block of K rounded to 1/127 of its largest magnitude
        if not rounded["block"] or not (rounded["who"] is None or mod.short_name in rounded["who"]):
            return None
        (a,) = inputs
        blk = rounded["block"]
        blocks = a.reshape(*a.shape[:-1], a.shape[-1] // blk, blk)  # (B, T, K/blk, blk)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        return (torch.round(blocks / torch.where(step == 0, torch.ones_like(step), step)) * step).reshape(a.shape)

    for name, mod in linears.items():
        mod.short_name = name.split(".")[-1]
        mod.register_forward_pre_hook(round_input)

    def logits(net) -> np.ndarray:
        with torch.no_grad():
            return net(x).logits[0].float().numpy()

    fp32 = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in base.weights.items()}
    quantized = {}
    for w in args.weights:
        zero, block = w.split(":")
        qw, _, _ = quantize_weights(base.weights, base.linear_modules,
                                    QuantConfig(weights=WeightType.INT8, zero=zero, block_size=int(block), algo="rtn"))  # fmt: skip
        quantized[w] = {k: torch.tensor(dequantize(v) if isinstance(v, QTensor) else np.asarray(v, np.float32)) for k, v in qw.items()}

    def load(weights: dict) -> None:
        with torch.no_grad():
            for m, mod in linears.items():
                if f"{m}.weight" in weights:
                    mod.weight.copy_(weights[f"{m}.weight"])
            model.model.embed_tokens.weight.copy_(weights["model.embed_tokens.weight"])

    print(f"SmolLM2-135M-Instruct, int8 weights rounded to nearest, {len(ids)} tokens of verify's text; Δppl % (KL)")
    print(f"{'adapter':<8}{'weights':<10}{'act block':>10}  {'rounded':<10}{'Δppl %':>8}{'KL':>10}{'clear %':>9}")
    net = model
    for adapter in ["none", *args.adapters]:
        if adapter != "none":
            net = PeftModel.from_pretrained(model if net is model else net.unload(), str(ADAPTERS[adapter])).eval()
        load(fp32)
        rounded["block"] = 0
        ref = logits(net)
        for w in args.weights:
            load(quantized[w])
            for block in sorted({0, *args.act_blocks}):
                for who in (["-"] if block == 0 else args.rounded):
                    rounded["block"], rounded["who"] = block, SUBSETS.get(who, (who,))
                    f = compare_logits(ref, logits(net), ids, 0.5)
                    print(f"{adapter:<8}{w:<10}{block or '-':>10}  {who:<10}{f['ppl_increase']:>+8.2f}{f['kl']:>10.2e}{f['top1_clear']:>9.1f}",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
