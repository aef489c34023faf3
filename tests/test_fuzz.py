"""Fuzzing: adapter_config.json contents, safetensors headers and manifests. Only lora-edge's own
errors may come out (one line, no traceback at the CLI) — never a crash or another exception."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_edge
from lora_edge.compile.peft import read_adapter
from lora_edge.errors import AdapterError, LoraEdgeError
from lora_edge.st_io import read_safetensors

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=12), st.sampled_from(["q_proj", ".*", "(", "layers", "all-linear", "[a-", "LORA", "none"]))  # fmt: skip
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=10)  # fmt: skip
CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out", "peft_type", "use_dora", "modules_to_save", "whatever"]  # fmt: skip


@pytest.fixture(scope="module")
def base_model(tiny_base):
    from lora_edge.compile.models.loader import load_base

    return load_base(tiny_base)[0]


@pytest.fixture(scope="module")
def adapter_copy(tiny_adapters, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ad"
    shutil.copytree(tiny_adapters["qv_r4"], path)
    return path


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_value, max_size=6))
def test_fuzzed_adapter_config_gives_only_our_errors(base_model, adapter_copy, changes):
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg.update(changes)
    (adapter_copy / "adapter_config.json").write_text(json.dumps(cfg))
    try:
        read_adapter("x", adapter_copy, base_model)
    except LoraEdgeError as exc:
        assert "\n" not in str(exc)


@st.composite
def headers(draw):
    n = draw(st.integers(0, 3))
    entries = {}
    for i in range(n):
        entries[draw(st.text(max_size=6))] = draw(st.one_of(
            json_value,
            st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "X9"]),
                                   "shape": st.lists(st.integers(-2, 2**33), max_size=3),
                                   "data_offsets": st.lists(st.integers(-5, 2**33), min_size=0, max_size=3)}),
        ))  # fmt: skip
    return json.dumps(entries).encode()


@FUZZ
@given(headers(), st.binary(max_size=64), st.integers(-3, 3))
def test_fuzzed_safetensors_headers_give_only_our_errors(tmp_path_factory, header, data, skew):
    f = tmp_path_factory.mktemp("st") / "a.safetensors"
    f.write_bytes(struct.pack("<Q", max(0, len(header) + skew)) + header + data)
    try:
        read_safetensors(f, AdapterError)
    except AdapterError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.binary(max_size=40))
def test_random_bytes_are_not_a_safetensors_file(tmp_path_factory, blob):
    f = tmp_path_factory.mktemp("st") / "b.safetensors"
    f.write_bytes(blob)
    with pytest.raises(AdapterError):
        tensors = read_safetensors(f, AdapterError)
        if not tensors:  # an empty header with nothing after it is a valid, empty file
            raise AdapterError("empty")


MANIFEST_PATHS = [("schema_version",), ("base",), ("base", "spec"), ("base", "spec", "num_layers"), ("base", "identity"),
                  ("graph",), ("graph", "file"), ("slots",), ("adapters",), ("adapters", "qv_r4"), ("adapters", "qv_r4", "file"),
                  ("mode",), ("files",)]  # fmt: skip


@pytest.fixture(scope="module")
def pkg_copy(tiny_package, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzzpkg") / "pkg"
    shutil.copytree(tiny_package, path)
    return path, (path / "manifest.json").read_text()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(MANIFEST_PATHS), json_value)
def test_fuzzed_manifest_gives_only_our_errors(pkg_copy, where, value):
    path, original = pkg_copy
    manifest = json.loads(original)
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    try:
        lora_edge.load(path, verify=False)
    except LoraEdgeError as exc:
        assert "\n" not in str(exc)
    finally:
        (path / "manifest.json").write_text(original)
