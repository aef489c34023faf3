"""Reading PEFT adapters: PEFT's own matching rules, and a clear refusal for everything inexact."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edge.adapters.peft import pattern_value, read_adapter, target_matches
from lora_edge.errors import AdapterError, InputError, UnsupportedFeatureError

LINEAR = [f"model.layers.{i}.{blk}.{m}" for i in range(3)
          for blk, ms in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
          for m in ms] + ["lm_head"]  # fmt: skip
SHORT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "self_attn.q_proj", "mlp.up_proj"]
REGEXES = [r".*q_proj", r".*\.layers\.[01]\..*", r"model\.layers\.2\.mlp\..*", r".*(k|v)_proj", r"lm_head"]


@st.composite
def lora_configs(draw):
    cfg = {}
    if draw(st.booleans()):
        cfg["target_modules"] = draw(st.lists(st.sampled_from(SHORT + LINEAR[:4]), min_size=1, max_size=4, unique=True))
    else:
        cfg["target_modules"] = draw(st.sampled_from(REGEXES))
    if draw(st.booleans()):
        cfg["exclude_modules"] = draw(st.one_of(st.lists(st.sampled_from(SHORT), max_size=2, unique=True), st.sampled_from(REGEXES)))
    if isinstance(cfg["target_modules"], list) and draw(st.booleans()):  # PEFT allows layers only with lists
        cfg["layers_to_transform"] = draw(st.one_of(st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2, unique=True)))
        cfg["layers_pattern"] = draw(st.sampled_from([None, "layers", ["layers"], "h"]))
    return cfg


@settings(max_examples=300, deadline=None)
@given(lora_configs())
def test_target_matching_is_peft_s(cfg):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    peft_cfg = LoraConfig(**cfg)
    for key in LINEAR:
        want = check_target_module_exists(peft_cfg, key)
        want = bool(want) and not isinstance(want, _ExcludedModule)
        assert target_matches(cfg, key, set(LINEAR)) == want, key


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SHORT + [r"layers\.1\..*", r"layers\.[02]\.mlp\.down_proj", "model.layers.1.self_attn.q_proj"]),
                       st.integers(1, 9), max_size=4))  # fmt: skip
def test_rank_pattern_is_peft_s(patterns):
    from peft.utils.other import get_pattern_key

    for key in LINEAR:
        assert pattern_value(patterns, key, -1) == patterns.get(get_pattern_key(patterns.keys(), key), -1)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_reads_scaling_rank_and_alpha_patterns(tiny_base_model, tiny_adapters):
    a = read_adapter("p", tiny_adapters["patterns"], tiny_base_model)
    o = a.modules["model.layers.0.self_attn.o_proj"]
    assert (o.rank, o.alpha, o.scaling) == (6, 1.5, 1.5 / 6)
    assert a.modules["model.layers.1.mlp.up_proj"].rank == 3
    assert a.modules["model.layers.0.mlp.up_proj"].rank == 2
    assert a.modules["model.layers.2.mlp.down_proj"].scaling == 11 / 2
    r = read_adapter("r", tiny_adapters["all_r8_rslora"], tiny_base_model)
    assert r.modules["model.layers.0.mlp.gate_proj"].scaling == pytest.approx(16 / 8**0.5)
    ex = read_adapter("e", tiny_adapters["layers_exclude"], tiny_base_model)
    assert sorted(ex.modules) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]


BAD = {
    "missing": (lambda p: shutil.rmtree(p), InputError, "does not exist"),
    "not_adapter": (lambda p: (p / "adapter_config.json").unlink(), AdapterError, "no adapter_config.json"),
    "pickle": (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), AdapterError, "pickle"),
    "truncated": (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:-100]),
                  AdapterError, "truncated"),
    "garbage": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 7), AdapterError, "not a valid safetensors"),
    "bad_json": (lambda p: (p / "adapter_config.json").write_text("{not json"), AdapterError, "not valid JSON"),
    "dora_without_magnitudes": (lambda p: _edit_config(p, use_dora=True), AdapterError, "no lora_magnitude_vector"),
    "modules_to_save_not_saved": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), AdapterError, "modules_to_save"),
    "unknown_field": (lambda p: _edit_config(p, fancy_new_thing=3), UnsupportedFeatureError, "'fancy_new_thing'"),
    "not_lora": (lambda p: _edit_config(p, peft_type="IA3"), UnsupportedFeatureError, "peft_type"),
    "rank_mismatch": (lambda p: _edit_config(p, r=5), AdapterError, "rank 4 in the weights but 5"),
    "config_disagrees": (lambda p: _edit_config(p, target_modules=["q_proj"]), AdapterError, "do not select it"),
    "incomplete": (lambda p: _edit_config(p, target_modules=["q_proj", "v_proj", "k_proj"]), AdapterError, "incomplete"),
    "bad_r": (lambda p: _edit_config(p, r="eight"), AdapterError, "'r'"),
    "bad_regex": (lambda p: _edit_config(p, target_modules="(unclosed"), AdapterError, "regular expression"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_refused_by_name(case, tiny_base_model, tiny_adapters, tmp_path):
    mutate, err, needle = BAD[case]
    path = _copy(tiny_adapters["qv_r4"], tmp_path / "ad")
    mutate(path)
    with pytest.raises(err) as info:
        read_adapter("x", path, tiny_base_model)
    assert needle in str(info.value) and "\n" not in str(info.value)


def _rewrite_tensor(path, fn):
    from lora_edge.st_io import read_safetensors
    from safetensors.numpy import save_file

    f = path / "adapter_model.safetensors"
    tensors = read_safetensors(f, AdapterError)
    save_file(fn(tensors), str(f))


def test_nan_weights_refused(tiny_base_model, tiny_adapters, tmp_path):
    path = _copy(tiny_adapters["qv_r4"], tmp_path / "ad")

    def poison(t):
        k = sorted(t)[0]
        t[k] = t[k].copy()
        t[k][0, 0] = np.nan
        return t

    _rewrite_tensor(path, poison)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        read_adapter("x", path, tiny_base_model)


def test_adapter_for_another_base_names_module_and_shapes(foreign_adapter, tiny_base_model):
    with pytest.raises(AdapterError, match=r"q_proj' expects weight \(48, 48\) but the base has \(64, 64\)"):
        read_adapter("x", foreign_adapter, tiny_base_model)


def test_module_missing_from_base(tiny_base_model, tiny_adapters, tmp_path):
    path = _copy(tiny_adapters["qv_r4"], tmp_path / "ad")
    _rewrite_tensor(path, lambda t: {k.replace("layers.0.", "layers.7."): v for k, v in t.items()})
    _edit_config(path, target_modules=".*")
    with pytest.raises(AdapterError, match="does not exist in the base"):
        read_adapter("x", path, tiny_base_model)


def test_bf16_adapter_reads_like_float32(tiny_base_model, tiny_adapters, tmp_path):
    """Adapters saved in bfloat16 are widened exactly (st_io handles BF16 without torch)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = _copy(tiny_adapters["qv_r4"], tmp_path / "ad")
    f = path / "adapter_model.safetensors"
    t = {k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}
    save_file(t, str(f))
    a = read_adapter("x", path, tiny_base_model)
    m = a.modules["model.layers.0.self_attn.q_proj"]
    want = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float().numpy().T
    assert np.array_equal(m.a, want)


def test_safetensors_header_lies_are_caught(tmp_path):
    from lora_edge.st_io import read_safetensors

    header = json.dumps({"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    f = tmp_path / "a.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)  # 16 bytes of data, header says 64
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        read_safetensors(f, AdapterError)
