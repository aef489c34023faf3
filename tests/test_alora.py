"""Activated LoRA (PEFT's alora_invocation_tokens): the adapter applies from its invocation tokens on, so the KV
cache of everything before them is the base's and a conversation switches to the adapter without a new prefill.
PyTorch + PEFT's aLoRA on the same weights is the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FP32_TOL, make_adapter

import lora_edge
from lora_edge.compile.pipeline import export
from lora_edge.config import AdapterSpec, ExportConfig
from lora_edge.errors import AdapterError, InputError, RuntimeInputError

INVOKE = [17, 42, 99]  # the invocation sequence
PREFIX = [5, 8, 250, 11, 3, 64]  # a conversation so far, without it
REST = [*INVOKE, 7, 3, 77]  # the invocation, then more


@pytest.fixture(scope="module")
def alora(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("alora") / "a", seed=7, task_type="CAUSAL_LM", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=INVOKE)  # fmt: skip


@pytest.fixture(scope="module")
def packages(tiny_base, tiny_adapters, alora, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("alora-pkg")
    out = {}
    for attention in ("fused", "reference"):
        out[attention] = root / attention
        export(ExportConfig(base=tiny_base, output=out[attention], attention=attention,
                            adapters=(AdapterSpec("act", alora), AdapterSpec("qv", tiny_adapters["qv_r4"]))))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def peft(tiny_base, alora):
    from peft import PeftModel

    from lora_edge.compile.models.loader import load_hf_model

    return PeftModel.from_pretrained(load_hf_model(tiny_base), str(alora)).eval()


def _peft_logits(peft, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return peft(torch.tensor([ids])).logits.numpy()


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_activated_adapter_matches_peft(packages, peft, attention):
    model = lora_edge.load(packages[attention])
    for ids in ([*PREFIX, *REST], [*PREFIX, 7, 3], [*INVOKE, *PREFIX, *INVOKE, 9]):  # invoked once, never, twice
        got = model.forward(np.array([ids]), "act")
        assert np.abs(got - _peft_logits(peft, ids)).max() <= FP32_TOL
    base = model.forward(np.array([[*PREFIX, *REST]]), None)
    got = model.forward(np.array([[*PREFIX, *REST]]), "act")
    assert np.array_equal(got[:, : len(PREFIX)], base[:, : len(PREFIX)])  # before the invocation: the base, exactly
    assert np.abs(got[:, len(PREFIX) :] - base[:, len(PREFIX) :]).max() > 100 * FP32_TOL


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_switching_to_it_reuses_the_base_cache(packages, peft, attention):
    """The base computed the conversation; the activated adapter continues from that KV cache, no new prefill."""
    model = lora_edge.load(packages[attention])
    _, past = model.forward(np.array([PREFIX]), None, return_past=True)
    got = model.forward(np.array([REST]), "act", past=past)
    want = _peft_logits(peft, [*PREFIX, *REST])[:, len(PREFIX) :]
    assert np.abs(got - want).max() <= FP32_TOL
    # a plain LoRA adapter would need the prefix recomputed: reusing the base's cache is wrong for it
    wrong = model.forward(np.array([REST]), "qv", past=past)
    right = model.forward(np.array([[*PREFIX, *REST]]), "qv")[:, len(PREFIX) :]
    assert np.abs(wrong - right).max() > 100 * FP32_TOL


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_greedy_generation_matches_peft(packages, peft, attention):
    import torch

    model = lora_edge.load(packages[attention])
    prompt = [*PREFIX, *REST]
    with torch.no_grad():
        want = peft.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()  # fmt: skip
    assert model.generate_ids(prompt, "act", 12, 12)[0] == want
    rows = model.generate_ids_batch([prompt, PREFIX, [*INVOKE, 5]], "act", 6, 6)
    assert rows == [model.generate_ids(p, "act", 6, 6) for p in (prompt, PREFIX, [*INVOKE, 5])]


@pytest.mark.parametrize("chunk", [2, 4])
def test_a_prompt_prefilled_in_chunks_keeps_the_activation(packages, peft, monkeypatch, chunk):
    """Prefilled a few tokens a call, the invocation split across calls: the mask found over the whole prompt is
    bound a call's columns at a time, and generation is PEFT's."""
    import torch

    from lora_edge.runtime.loop import FusedRows

    monkeypatch.setattr("lora_edge.runtime.loop.PREFILL_CHUNK", chunk)
    model = lora_edge.load(packages["fused"])
    prompt = [*PREFIX, *REST]  # the invocation at columns 6-8: across chunks of 2 and of 4
    key = model._adapters.key("act")
    rows = FusedRows(model, model._binding(key), 1, len(prompt) + 1, model._adapters.invocation(key))
    got = rows.prefill(np.asarray([prompt]), np.asarray([len(prompt)]))
    assert np.abs(got - _peft_logits(peft, prompt)[:, -1]).max() <= FP32_TOL
    with torch.no_grad():
        want = peft.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()  # fmt: skip
    assert model.generate_ids(prompt, "act", 12, 12)[0] == want
    assert model.generate_ids(PREFIX, "act", 12, 12)[0] == model.generate_ids(PREFIX, None, 12, 12)[0]  # never invoked


def test_it_cannot_blend_merge_or_run_on_the_native_kernel(packages, tiny_base, alora, tmp_path):
    model = lora_edge.load(packages["fused"])
    with pytest.raises(RuntimeInputError, match="cannot be blended"):
        model.forward(np.array([PREFIX]), {"act": 0.5, "qv": 0.5})
    with pytest.raises(InputError, match="cannot be merged"):
        export(ExportConfig(base=tiny_base, output=tmp_path / "m", adapters=(AdapterSpec("act", alora),), mode="merge"))
    with pytest.raises(InputError, match="standard-op branches"):
        export(ExportConfig(base=tiny_base, output=tmp_path / "n", adapters=(AdapterSpec("act", alora),), lora_kernel="native"))


def test_a_package_without_the_mask_refuses_it_and_one_with_it_takes_it_later(tiny_base, tiny_adapters, alora, peft, tmp_path):
    from lora_edge.adapters.manage import add_adapter

    plain = tmp_path / "plain"
    export(ExportConfig(base=tiny_base, output=plain, adapters=(AdapterSpec("wide", tiny_adapters["all_r8_rslora"]),)))
    with pytest.raises(AdapterError, match="export the base again with --alora"):
        add_adapter(plain, "act", alora)
    ready = tmp_path / "ready"
    export(ExportConfig(base=tiny_base, output=ready, adapters=(AdapterSpec("wide", tiny_adapters["all_r8_rslora"]),), alora=True))
    add_adapter(ready, "act", alora)
    model = lora_edge.load(ready)  # the invocation tokens travel inside the adapter file
    ids = [*PREFIX, *REST]
    assert np.abs(model.forward(np.array([ids]), "act") - _peft_logits(peft, ids)).max() <= FP32_TOL
    model.load_adapter("act2", alora)  # and from the PEFT directory, on the device
    assert np.array_equal(model.forward(np.array([ids]), "act2"), model.forward(np.array([ids]), "act"))
