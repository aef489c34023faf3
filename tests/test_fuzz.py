"""Fuzzing: adapter_config.json contents, safetensors files and headers, and manifests. Each case calls
the product, and only two outcomes pass: lora-edge's own error with a one-line message (what the CLI
prints, without a traceback), or success with a result that is right — never a crash or another
exception. Inputs known to be good must succeed, so a reader that refuses everything fails too."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lora_edge
from lora_edge.adapters.peft import read_adapter
from lora_edge.errors import AdapterError, LoraEdgeError
from lora_edge.st_io import read_safetensors

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=12), st.sampled_from(["q_proj", ".*", "(", "layers", "all-linear", "[a-", "LORA", "none"]))  # fmt: skip
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=10)  # fmt: skip
CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out", "peft_type", "use_dora", "modules_to_save", "whatever"]  # fmt: skip
GOOD_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}  # qv_r4's own


def assert_one_line(exc: LoraEdgeError) -> None:
    """A lora-edge error the CLI can print as it is: one non-empty line. (Any other exception is not caught
    by these tests, and fails them.)"""
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, msg


def same_json(a, b) -> bool:
    """Equal as JSON values, types included (True is not 1, 4.0 is not 4)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.fixture(scope="module")
def adapter_copy(tiny_adapters, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ad"
    shutil.copytree(tiny_adapters["qv_r4"], path)
    weights = read_safetensors(path / "adapter_model.safetensors", AdapterError)
    return path, weights


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_value, max_size=6))
@example({})  # the adapter's own config
@example({"r": 4, "lora_alpha": 8})  # rewritten with its own values
def test_fuzzed_adapter_config_gives_only_our_errors(tiny_base_model, adapter_copy, changes):
    path, weights = adapter_copy
    cfg = dict(GOOD_CONFIG, **changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    unchanged = all(k in GOOD_CONFIG and same_json(v, GOOD_CONFIG[k]) for k, v in changes.items())
    try:
        adapter = read_adapter("x", path, tiny_base_model)
    except LoraEdgeError as exc:
        event("refused")
        assert not unchanged, f"the adapter's own config was refused: {exc}"
        assert_one_line(exc)
        return
    event("accepted")  # then every module of the weight file was read, and read exactly as stored
    want = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in weights if k.endswith(".lora_A.weight")}
    assert set(adapter.modules) == want
    for name, m in adapter.modules.items():
        a, b = weights[f"base_model.model.{name}.lora_A.weight"], weights[f"base_model.model.{name}.lora_B.weight"]
        assert m.rank == 4 and np.isfinite(m.scaling) and np.array_equal(m.a, a.T)
        np.testing.assert_allclose(m.b, m.scaling * b.T, rtol=1e-6, atol=0)
    if unchanged:
        assert all(m.scaling == 8 / 4 for m in adapter.modules.values())


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
    n = max(0, len(header) + skew)
    f.write_bytes(struct.pack("<Q", n) + header + data)
    try:
        tensors = read_safetensors(f, AdapterError)  # the error class the caller asks for, and no other
    except AdapterError as exc:
        assert_one_line(exc)
        return
    # accepted: the header it read (the first n bytes after the length) lists exactly these tensors and shapes
    parsed = json.loads((header + data)[:n])
    assert set(tensors) == set(parsed) - {"__metadata__"}
    for name, t in tensors.items():
        assert t.shape == tuple(parsed[name]["shape"]), name


def _tensors():
    dtypes = st.sampled_from([np.float32, np.float16, np.int8])
    shapes = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4)
    arrays = st.tuples(dtypes, shapes).flatmap(lambda ds: hnp.arrays(ds[0], ds[1]))
    return st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=6), arrays, min_size=1, max_size=3)


@st.composite
def safetensors_files(draw):
    """(how, bytes): random bytes, or a real file written by the safetensors library, then kept intact,
    truncated, or with one bit flipped in its header (length prefix included) or in its data."""
    how = draw(st.sampled_from(["random", "intact", "truncated", "header_bit", "data_bit"]))
    if how == "random":
        return how, draw(st.binary(max_size=40))
    from safetensors.numpy import save

    blob = bytearray(save(draw(_tensors())))
    data_start = 8 + struct.unpack("<Q", blob[:8])[0]
    if how == "truncated":
        return how, bytes(blob[: draw(st.integers(0, len(blob) - 1))])
    if how != "intact":
        at = draw(st.integers(0, data_start - 1) if how == "header_bit" else st.integers(data_start, len(blob) - 1))
        blob[at] ^= 1 << draw(st.integers(0, 7))
    return how, bytes(blob)


@FUZZ
@given(safetensors_files())
def test_safetensors_files_read_as_the_safetensors_library_reads_them(tmp_path_factory, case):
    """A file the safetensors library reads gives the same tensors (floats widened to float32); a truncated
    file is refused; anything else is read or refused with a one-line AdapterError."""
    from safetensors.numpy import load

    how, blob = case
    f = tmp_path_factory.mktemp("st") / "b.safetensors"
    f.write_bytes(blob)
    try:
        want = load(blob)
    except Exception:  # noqa: BLE001 - the library's verdict, whatever form its refusal takes
        want = None
    assert want is not None or how not in ("intact", "data_bit"), "the safetensors library refused its own file"
    try:
        got = read_safetensors(f, AdapterError)
    except AdapterError as exc:
        event(f"{how}: refused")
        assert_one_line(exc)
        assert want is None, f"a file the safetensors library reads was refused: {exc}"
        return
    event(f"{how}: read")
    assert how != "truncated", "a truncated file was read"
    if want is None:
        assert how in ("random", "header_bit")
        if how == "random":  # at most 40 bytes: room for an empty header, never for a tensor
            assert got == {}
        return
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == (np.float32 if w.dtype.kind == "f" else w.dtype), name
        np.testing.assert_array_equal(got[name], w.astype(got[name].dtype), err_msg=name)


MANIFEST_PATHS = [("schema_version",), ("base",), ("base", "spec"), ("base", "spec", "num_layers"), ("base", "identity"),
                  ("graph",), ("graph", "file"), ("slots",), ("adapters",), ("adapters", "qv_r4"), ("adapters", "qv_r4", "file"),
                  ("mode",), ("files",)]  # fmt: skip


class PackageCopy(NamedTuple):
    path: Path
    original: str  # manifest.json's text: corrupted below on purpose, so handled as JSON

    def __repr__(self) -> str:  # a failing example names the package, not its whole manifest
        return f"PackageCopy({self.path})"


@pytest.fixture(scope="module")
def pkg_copy(tiny_package, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzzpkg") / "pkg"
    shutil.copytree(tiny_package, path)
    return PackageCopy(path, (path / "manifest.json").read_text())


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(MANIFEST_PATHS), json_value)
@example(("mode",), "branch")  # the value it already has
@example(("graph", "file"), "model.onnx")
def test_fuzzed_manifest_gives_only_our_errors(pkg_copy, where, value):
    """A changed manifest is refused with a one-line PackageError, or loads — and then it runs (or refuses
    an input with our error): never an ONNX Runtime or Python exception at load or at the first call."""
    path, original = pkg_copy
    manifest = json.loads(original)
    node = manifest
    for key in where[:-1]:
        node = node[key]
    unchanged = same_json(node[where[-1]], value)
    node[where[-1]] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    try:
        try:
            model = lora_edge.load(path, verify=False)
        except LoraEdgeError as exc:
            assert not unchanged, f"the package's own manifest was refused: {exc}"
            assert_one_line(exc)
            return
        try:
            logits = model.forward([[1, 2, 3]], adapter="qv_r4")
        except LoraEdgeError as exc:
            assert not unchanged, f"the package's own manifest did not run: {exc}"
            assert_one_line(exc)
            return
        assert logits.shape == (1, 3, 320) and np.isfinite(logits).all()
    finally:
        (path / "manifest.json").write_text(original)
