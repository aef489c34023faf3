"""The package on disk: checksums, identity of adapter files, schema versions, determinism, no torch on device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lora_edge
from conftest import QUESTIONS
from lora_edge.errors import PackageError
from lora_edge.package.manifest import SCHEMA_VERSION, Chunks
from lora_edge.package.store import read_manifest


def _copy(pkg, tmp_path):
    return Path(shutil.copytree(pkg, tmp_path / "pkg"))


def test_manifest_records_slots_and_adapters(tiny_package):
    m = read_manifest(tiny_package)
    assert m.format == "lora-edge-package" and m.schema_version == SCHEMA_VERSION and m.recipe == "exact"
    slot = next(s for s in m.slots if s.name == "model.layers.0.self_attn.qkv_proj")
    assert slot.lora_A == "model.layers.0.self_attn.qkv_proj.lora_A" and slot.in_features == 64
    assert [p.module for p in slot.parts] == [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]
    assert slot.out_features == 64 + 32 + 32
    assert "qv_r4" in slot.adapters and "regex_layers" in slot.adapters  # regex_layers targets k_proj
    down2 = next(s for s in m.slots if s.name == "model.layers.2.mlp.down_proj")
    assert "regex_layers" not in down2.adapters and "patterns" in down2.adapters
    assert m.adapters["qv_r4"].scalings == (2.0,)
    assert set(m.files) >= {"model.onnx", "model.onnx.data", "adapters/qv_r4.onnx_adapter", "tokenizer.json", "config.json"}
    names = [i.name for i in m.graph.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    assert [o.name for o in m.graph.outputs][:2] == ["logits", "present.0.key"]


def test_grouped_b_is_stored_in_chunks_without_block_diagonal_zeros(tiny_package):
    """q (64) / k (32) / v (32) as four 32-wide chunks of B and gate/up as two 128-wide ones, every module at
    the group's highest rank: an adapter of q/v only leaves k's chunk and A columns zero (and fills the
    others), and a module the adapter skips in gate/up leaves its chunk zero beside a lower-rank one."""
    import onnxruntime as ort

    by = {s.name: s for s in read_manifest(tiny_package).slots}
    assert by["model.layers.0.self_attn.qkv_proj"].lora_B_chunks == Chunks(width=32, modules=(0, 0, 1, 2))
    assert by["model.layers.0.mlp.gate_up_proj"].lora_B_chunks == Chunks(width=128, modules=(0, 1))
    assert by["model.layers.0.self_attn.o_proj"].lora_B_chunks is None  # one module: B is (r, out)

    def params(name):
        t = ort.AdapterFormat.read_adapter(str(tiny_package / "adapters" / f"{name}.onnx_adapter")).get_parameters()
        return {k: v.numpy() for k, v in t.items()}

    qv = params("qv_r4")
    a, b = qv["model.layers.0.self_attn.qkv_proj.lora_A"], qv["model.layers.0.self_attn.qkv_proj.lora_B"]
    assert a.shape == (64, 12) and b.shape == (4, 4, 32)  # (in, 3 modules x r 4), (chunks, r, width)
    assert not a[:, 4:8].any() and not b[2].any()  # k_proj: not targeted
    assert a[:, :4].any() and a[:, 8:].any() and b[0].any() and b[1].any() and b[3].any()
    pat = params("patterns")  # up_proj rank 3 in layer 1, gate_proj not targeted
    gu = pat["model.layers.1.mlp.gate_up_proj.lora_B"]
    assert gu.shape == (2, 3, 128) and not gu[0].any() and gu[1].any()
    assert pat["model.layers.1.mlp.gate_up_proj.lora_A"].shape == (64, 6)


def test_tampered_file_is_refused_by_name(tiny_package, tmp_path):
    pkg = _copy(tiny_package, tmp_path)
    data = bytearray((pkg / "model.onnx.data").read_bytes())
    data[100] ^= 1
    (pkg / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model.onnx.data does not match its sha256"):
        lora_edge.load(pkg)


def test_truncated_adapter_is_refused(tiny_package, tmp_path):
    pkg = _copy(tiny_package, tmp_path)
    f = pkg / "adapters" / "qv_r4.onnx_adapter"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(PackageError, match="qv_r4.onnx_adapter has .* bytes"):
        lora_edge.load(pkg)


def test_adapter_from_another_base_is_refused(tiny_package, tmp_path):
    """Swap in an adapter file compiled for another base and fix up the checksums: identity still catches it."""
    from conftest import make_adapter, make_tiny_base

    from lora_edge.config import AdapterSpec, ExportConfig
    from lora_edge.compile.pipeline import export
    from lora_edge.package.store import read_manifest, write_manifest

    other = make_tiny_base(tmp_path / "ob", "gqa_tied", seed=42)  # same shapes, other weights
    ad = make_adapter(other, tmp_path / "oa")
    export(ExportConfig(base=other, output=tmp_path / "opkg", adapters=(AdapterSpec("qv_r4", ad),)))
    pkg = _copy(tiny_package, tmp_path)
    shutil.copy(tmp_path / "opkg" / "adapters" / "qv_r4.onnx_adapter", pkg / "adapters" / "qv_r4.onnx_adapter")
    write_manifest(pkg, read_manifest(pkg, verify=False))
    with pytest.raises(PackageError, match="compiled for another base model"):
        lora_edge.load(pkg)


def test_shipped_adapters_are_read_when_first_chosen(tiny_package):
    """Loading checks every shipped adapter file and keeps none of their tensors; the first call that chooses one (alone,
    in a blend) reads it, and it gives what it gave when every adapter was read at load."""
    import numpy as np

    model = lora_edge.load(tiny_package)
    shipped = set(model.manifest.adapter_files())
    assert len(shipped) >= 3 and set(model.adapters) == shipped
    assert not model._adapters._tensors
    ids = np.arange(3, 12)[None]
    first = model.forward(ids, adapter="qv_r4")
    assert set(model._adapters._tensors) == {"qv_r4"}
    blend = model.forward(ids, adapter={"qv_r4": 0.5, "all_r8_rslora": 0.5})
    assert set(model._adapters._tensors) == {"qv_r4", "all_r8_rslora"}
    eager = lora_edge.load(tiny_package)
    for name in sorted(shipped):
        eager.check_adapter(name)
    assert len(eager._adapters._tensors) == len(shipped)
    assert np.array_equal(first, eager.forward(ids, adapter="qv_r4"))
    assert np.array_equal(blend, eager.forward(ids, adapter={"qv_r4": 0.5, "all_r8_rslora": 0.5}))


def test_newer_schema_gets_a_clear_message(tiny_package, tmp_path):
    pkg = _copy(tiny_package, tmp_path)
    m = json.loads((pkg / "manifest.json").read_text())
    m["schema_version"] = 99
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="upgrade lora-edge"):
        lora_edge.load(pkg)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="not a lora-edge package"):
        lora_edge.load(tmp_path)


def test_export_is_deterministic(tiny_base, tiny_adapters, tmp_path):
    from lora_edge.config import AdapterSpec, ExportConfig
    from lora_edge.compile.pipeline import export

    specs = (AdapterSpec("a", tiny_adapters["patterns"]), AdapterSpec("b", tiny_adapters["qv_r4"]))
    m1 = export(ExportConfig(base=tiny_base, output=tmp_path / "one", adapters=specs)).manifest
    m2 = export(ExportConfig(base=tiny_base, output=tmp_path / "two", adapters=specs)).manifest
    assert m1.files == m2.files
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()


def test_concurrent_calls_with_different_adapters_do_not_mix(tiny_package):
    from concurrent.futures import ThreadPoolExecutor

    model = lora_edge.load(tiny_package)
    adapters = [None, "qv_r4", "patterns", "all_r8_rslora"]
    prompts = [[3, 9, 27, 81], [5, 6, 7], [100, 200, 10, 20, 30]]
    alone = {(a, i): model.generate_ids(p, a, 8, 8)[0] for a in adapters for i, p in enumerate(prompts)}
    jobs = [(a, i) for _ in range(6) for a in adapters for i in range(len(prompts))]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: model.generate_ids(prompts[job[1]], job[0], 8, 8)[0], jobs))
    assert all(r == alone[j] for r, j in zip(results, jobs))
    assert len({tuple(v) for v in alone.values()}) > len(prompts)  # the adapters really differ


DEVICE_SCRIPT = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "transformers", "peft", "onnx", "onnxscript", "optimum", "safetensors"}:
            raise ImportError(f"{name} is not installed on the device")
sys.meta_path.insert(0, Block())
import lora_edge
m = lora_edge.load(sys.argv[1])
logits = m.forward([[1, 2, 3]], adapter=m.adapters[0])
text = m.generate("What is snow?", adapter=m.adapters[0], max_new_tokens=4)
assert logits.shape == (1, 3, 320), logits.shape
bad = sorted(k for k in sys.modules if k.split(".")[0] in {"torch", "transformers", "peft", "onnx"})
assert not bad, bad
print("ok", m.adapters[0], repr(text))
"""


def test_device_side_runs_without_torch_or_transformers(tiny_package):
    """`lora_edge.load` + generate with torch, transformers, peft and onnx made unimportable."""
    r = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(tiny_package)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_cli_run_without_torch(tiny_package):
    script = DEVICE_SCRIPT.split("import lora_edge")[0] + (
        "from lora_edge.cli import cli\n"
        "cli.main(['run', sys.argv[1], '--prompt', 'hi', '-n', '3', '-a', 'qv_r4'], standalone_mode=False)\n"
        "assert not [k for k in sys.modules if k.split('.')[0] in {'torch', 'transformers'}]\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(tiny_package)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_generate_a_list_of_prompts(tiny_package):
    model = lora_edge.load(tiny_package)
    prompts = [*QUESTIONS, "Hello world"]
    assert model.generate(prompts, adapter="qv_r4", max_new_tokens=5) == [model.generate(p, adapter="qv_r4", max_new_tokens=5) for p in prompts]
