"""A package's adapter set as something a device changes: adapters added to a shipped package, loaded at run time
from a file or a PEFT directory (no torch), removed; each at any strength or blended, against PyTorch + PEFT."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ADAPTER_KINDS, FP32_TOL, make_adapter, make_tiny_base

import lora_edge
from lora_edge.adapters.manage import add_adapter, remove_adapter
from lora_edge.cli import cli
from lora_edge.compile.pipeline import export
from lora_edge.config import AdapterSpec, ExportConfig, QuantConfig, WeightType
from lora_edge.errors import PackageError, RuntimeInputError
from lora_edge.package.store import read_manifest

IDS = np.array([[5, 17, 42, 99, 7, 3, 250, 11]])
WIDE, NARROW = "all_r8_rslora", "qv_r4"  # every projection; q and v only
PACKAGE_QUANTS = {"fp32": QuantConfig(), "int4": QuantConfig(weights=WeightType.INT4, algo="rtn")}


@pytest.fixture(scope="module")
def kernel():
    from lora_edge.native.build import build

    return build()


def _export(base, out, adapters, **kw) -> Path:
    export(ExportConfig(base=base, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in adapters.items()), **kw))
    return out


@pytest.fixture(scope="module")
def packages(tiny_base, tiny_adapters, tmp_path_factory):
    """Per quantization: the package exported with both adapters, and one exported with WIDE then given NARROW."""
    root = tmp_path_factory.mktemp("living")
    out = {}
    for q, qcfg in PACKAGE_QUANTS.items():
        both = _export(tiny_base, root / f"both-{q}", {WIDE: tiny_adapters[WIDE], NARROW: tiny_adapters[NARROW]}, quant=qcfg)
        added = _export(tiny_base, root / f"added-{q}", {WIDE: tiny_adapters[WIDE]}, quant=qcfg)
        add_adapter(added, NARROW, tiny_adapters[NARROW])
        out[q] = (both, added)
    return out


@pytest.mark.parametrize("q", list(PACKAGE_QUANTS))
def test_an_added_adapter_equals_exporting_with_it(packages, q):
    both, added = packages[q]
    want, got = lora_edge.load(both), lora_edge.load(added)
    assert got.adapters == want.adapters == sorted([WIDE, NARROW])
    for adapter in (NARROW, WIDE, None):
        assert np.abs(got.forward(IDS, adapter) - want.forward(IDS, adapter)).max() <= 1e-6
    assert (added / "adapters" / f"{NARROW}.onnx_adapter").read_bytes() == (both / "adapters" / f"{NARROW}.onnx_adapter").read_bytes()
    m = read_manifest(added)  # checksums verified
    assert m.adapters[NARROW] == read_manifest(both).adapters[NARROW] and NARROW in m.slots[0].adapters


def test_remove_then_list(packages, tmp_path):
    pkg = Path(shutil.copytree(packages["fp32"][1], tmp_path / "pkg"))
    remove_adapter(pkg, NARROW)
    assert not (pkg / "adapters" / f"{NARROW}.onnx_adapter").exists()
    m = read_manifest(pkg)
    assert list(m.adapters) == [WIDE] and all(NARROW not in s.adapters for s in m.slots)
    assert lora_edge.load(pkg).adapters == [WIDE]
    listed = CliRunner().invoke(cli, ["adapters", "list", str(pkg)])
    assert listed.exit_code == 0 and WIDE in listed.output and NARROW not in listed.output


@pytest.mark.parametrize("args, needle", [
    (lambda a, pkg: ["add", pkg, f"{WIDE}={a[WIDE]}"], "has no LoRA branch in this package"),  # down_proj etc.: no slot
    (lambda a, pkg: ["add", pkg, f"{NARROW}={a[NARROW]}"], "already has an adapter"),
    (lambda a, pkg: ["add", pkg, f"x={a['other_base']}"], "trained for another base model"),
    (lambda a, pkg: ["add", pkg, f"x={a['dora']}"], "needs the base model's float weights"),
    (lambda a, pkg: ["remove", pkg, "nope"], "has no adapter 'nope'"),
])  # fmt: skip
def test_refusals_are_one_line(tiny_base, tiny_adapters, tmp_path_factory, args, needle):
    root = tmp_path_factory.mktemp("refuse")
    pkg = _export(tiny_base, root / "pkg", {NARROW: tiny_adapters[NARROW]})
    other = make_tiny_base(root / "other", "mha_untied")
    sources = {**tiny_adapters, "other_base": make_adapter(other, root / "oa"),
               "dora": make_adapter(tiny_base, root / "dora", use_dora=True)}  # fmt: skip
    before = (pkg / "manifest.json").read_bytes()
    r = CliRunner().invoke(cli, ["adapters", *map(str, args(sources, pkg))])
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (pkg / "manifest.json").read_bytes() == before  # nothing written


def test_a_failed_add_leaves_the_package_intact(packages, tiny_adapters, tmp_path, monkeypatch):
    import lora_edge.adapters.manage as manage

    pkg = Path(shutil.copytree(packages["fp32"][0], tmp_path / "pkg"))
    before = {p.relative_to(pkg): p.read_bytes() for p in pkg.rglob("*") if p.is_file()}

    def broken(root, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(manage, "write_manifest", broken)
    with pytest.raises(OSError):
        manage.add_adapter(pkg, "third", tiny_adapters[NARROW])
    assert {p.relative_to(pkg): p.read_bytes() for p in pkg.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".pkg.*"))  # no staging left behind


# -- strength and blends against PEFT ----------------------------------------------------------------
def _peft_logits(base, adapters: dict[str, Path], weights: dict[str, float]) -> np.ndarray:
    """PEFT with each adapter's scaling multiplied (one adapter), or add_weighted_adapter(..., "cat") (a blend)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from lora_edge.compile.models.loader import load_hf_model

    names = list(weights)
    model = PeftModel.from_pretrained(load_hf_model(base), str(adapters[names[0]]), adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    if len(names) == 1:
        for module in model.modules():
            if isinstance(module, LoraLayer) and names[0] in module.scaling:
                module.scaling[names[0]] *= weights[names[0]]
        model.set_adapter(names[0])
    else:
        model.add_weighted_adapter(names, [weights[n] for n in names], "blend", combination_type="cat")
        model.set_adapter("blend")
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("weights", [{NARROW: 0.5}, {WIDE: -1.5}, {NARROW: 0.7, WIDE: 0.3}, {"patterns": 1.0, NARROW: 2.0}])
def test_strength_and_blend_match_peft(tiny_package, tiny_base, tiny_adapters, weights):
    model = lora_edge.load(tiny_package)
    choice = next(iter(weights)) if len(weights) == 1 else weights
    got = model.forward(IDS, choice, scale=next(iter(weights.values()))) if len(weights) == 1 else model.forward(IDS, choice)
    want = _peft_logits(tiny_base, tiny_adapters, weights)
    # float32 rounding of the base's logits and of the delta's, which grows with the weights
    assert np.abs(got - want).max() <= FP32_TOL * (1 + sum(map(abs, weights.values())))
    assert np.abs(got - model.forward(IDS, None)).max() > 100 * FP32_TOL  # the adapters do something here


def test_a_strength_of_one_is_the_adapter_and_zero_the_base(tiny_package):
    model = lora_edge.load(tiny_package)
    assert np.array_equal(model.forward(IDS, {NARROW: 1.0}), model.forward(IDS, NARROW))
    assert np.abs(model.forward(IDS, NARROW, scale=0.0) - model.forward(IDS, None)).max() <= 1e-6
    with pytest.raises(RuntimeInputError, match="unknown adapter 'nope'"):
        model.forward(IDS, {"nope": 0.5, NARROW: 0.5})
    with pytest.raises(RuntimeInputError, match="finite number"):
        model.forward(IDS, NARROW, scale=float("nan"))


def _deltas(tensors, storage) -> dict[str, np.ndarray]:
    """Per slot, the (in, out) product A @ B an adapter's stored tensors compute (dequantized as the kernel reads them)."""
    from lora_edge.native.contract import W8A8_BLOB
    from lora_edge.native.encode import q8x_rows, unpack_blob

    def flip(q):  # q8x codes are stored XOR 0x80
        return (q.view(np.uint8) ^ np.uint8(0x80)).view(np.int8).astype(np.float32)

    pairs = {}
    for s in storage.slots:
        if s.lora_A in tensors:
            a, b = tensors[s.lora_A].astype(np.float32), tensors[s.lora_B].astype(np.float32)
            if s.lora_A_scale:
                a, b = a * tensors[s.lora_A_scale], b * tensors[s.lora_B_scale][..., None]
            pairs[s.name] = (a, b if b.ndim == 3 else b[None])
    if W8A8_BLOB in tensors:
        slots = {x.lora_A: x for x in storage.slots}
        k_rows = [q8x_rows(slots[a].in_features) for a, *_ in storage.blob]
        for (a_name, *_), (_, q) in zip(storage.blob, unpack_blob(tensors[W8A8_BLOB], k_rows)):
            if q is not None:
                qa, sa, qb, sb = q
                a = flip(qa).transpose(0, 2, 1).reshape(-1, qa.shape[1])[: slots[a_name].in_features] * sa  # (K, R4)
                b = flip(qb).transpose(0, 1, 3, 2).reshape(qb.shape[0], -1, qb.shape[2]) * sb[..., None]  # (chunks, r4, c)
                pairs[slots[a_name].name] = (a, b)
    out = {}
    for s in storage.slots:
        if s.name in pairs:
            a, b = pairs[s.name]
            modules = s.lora_B_chunks.modules if s.lora_B_chunks else (0,)
            r = b.shape[1]  # (chunk j reads its module's r columns of A)
            out[s.name] = np.concatenate([a[:, m * r : (m + 1) * r] @ b[j] for j, m in enumerate(modules)], axis=1)
    return out


@pytest.mark.parametrize("lora_dtype", ["float16", "int8", "w8a8"])
def test_native_blends_are_the_weighted_sum_of_the_stored_adapters(tiny_base, tiny_adapters, tmp_path, lora_dtype, kernel):
    """On the native kernel's storage a blend concatenates what is stored (int8, w8a8: codes as they are, B's scales
    weighted; nothing requantized): every branch's product is exactly the weighted sum of its adapters' products."""
    from lora_edge.adapters.blend import blend
    from lora_edge.adapters.storage import Storage

    pkg = _export(tiny_base, tmp_path / "pkg", {n: tiny_adapters[n] for n in (WIDE, NARROW)}, lora_kernel="native",
                  lora_dtype=lora_dtype)  # fmt: skip
    manifest = read_manifest(pkg)
    storage = Storage.of(manifest)
    stored = {n: storage.read(pkg / f, n) for n, f in manifest.adapter_files().items()}
    weights = {WIDE: 0.6, NARROW: -0.8}
    got = _deltas(blend([(n, stored[n], w) for n, w in weights.items()], storage), storage)
    parts = {n: _deltas(stored[n], storage) for n in weights}
    assert set(got) == set(parts[WIDE]) | set(parts[NARROW])
    # int8/w8a8: B's float32 scales times w, one float32 rounding; float16: w * B rounded to float16 once (2^-11)
    rel = 1e-3 if lora_dtype == "float16" else 1e-5
    for slot, delta in got.items():
        want = sum(w * parts[n][slot] for n, w in weights.items() if slot in parts[n])
        assert np.abs(delta - want).max() <= rel * np.abs(want).max()
    model = lora_edge.load(pkg)  # and the kernel runs it
    assert np.abs(model.forward(IDS, weights) - model.forward(IDS, WIDE)).max() > 0.1


# -- loading on the device ----------------------------------------------------------------------------
def test_a_peft_directory_loads_on_the_device_without_torch(tiny_package, tiny_adapters, tmp_path):
    """The package has no 'patterns2'; the device converts the PEFT directory with numpy in a process where torch,
    transformers, onnx and peft cannot be imported, and computes what an export with it computes."""
    ref = _export(Path(read_manifest(tiny_package).base.source), tmp_path / "ref", {"patterns": tiny_adapters["patterns"]})
    want = lora_edge.load(ref).forward(IDS, "patterns")
    code = (
        "import sys, numpy as np\n"
        "for name in ('torch', 'transformers', 'onnx', 'peft', 'safetensors'): sys.modules[name] = None\n"
        "import lora_edge\n"
        f"m = lora_edge.load({str(tiny_package)!r})\n"
        f"m.unload_adapter('patterns')\n"
        f"m.load_adapter('patterns2', {str(tiny_adapters['patterns'])!r})\n"
        f"np.save({str(tmp_path / 'got.npy')!r}, m.forward(np.array({IDS.tolist()}), 'patterns2'))\n"
        "assert m.adapters == ['all_r8_rslora', 'layers_exclude', 'lm_head', 'patterns2', 'qv_r4', 'regex_layers']\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "got.npy") - want).max() <= 1e-6


def test_adapter_files_know_their_base_and_layout(tiny_package, tiny_base, tiny_adapters, tmp_path):
    model = lora_edge.load(tiny_package)
    narrow = _export(tiny_base, tmp_path / "narrow", {NARROW: tiny_adapters[NARROW]})  # fewer slots: another layout
    with pytest.raises(PackageError, match=r"another slot layout \(\w{8}, this package's is \w{8}\)"):
        model.load_adapter("x", narrow / "adapters" / f"{NARROW}.onnx_adapter")
    other = make_tiny_base(tmp_path / "ob", "gqa_tied", seed=42)  # same shapes, other weights
    foreign = _export(other, tmp_path / "foreign", {n: make_adapter(other, tmp_path / n, **ADAPTER_KINDS[n]) for n in ADAPTER_KINDS})
    with pytest.raises(PackageError, match=r"another base model \(model_version \d+, this package's base is \d+\)"):
        model.load_adapter("x", foreign / "adapters" / f"{NARROW}.onnx_adapter")
    model.load_adapter("again", tiny_package / "adapters" / f"{NARROW}.onnx_adapter")
    assert np.array_equal(model.forward(IDS, "again"), model.forward(IDS, NARROW))


def test_run_takes_strengths_blends_and_loaded_adapters(tiny_package, tiny_adapters):
    r = CliRunner().invoke(cli, ["run", str(tiny_package), "-p", "hello", "-n", "4", "-a", f"{NARROW}@0.5",
                                 "-a", f"{NARROW}@0.7+{WIDE}@0.3", "--load", f"mine={tiny_adapters['patterns']}", "-a", "mine"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [line.split("|")[0].strip() for line in r.output.strip().splitlines()] == [f"{NARROW}@0.5", f"{NARROW}@0.7+{WIDE}@0.3", "mine"]
    bad = CliRunner().invoke(cli, ["run", str(tiny_package), "-p", "hi", "-a", f"{NARROW}@lots"])
    assert bad.exit_code == 2 and "is not a number" in bad.output


def test_a_dora_adapter_is_added_with_the_base(tiny_base, tmp_path):
    """DoRA's magnitudes need the base's float weights, which a package does not carry: --base gives them, and the
    result is what exporting with the adapter gives."""
    first, second = (make_adapter(tiny_base, tmp_path / n, seed=s, use_dora=True) for n, s in (("d1", 3), ("d2", 4)))
    both = _export(tiny_base, tmp_path / "both", {"d1": first, "d2": second})
    added = _export(tiny_base, tmp_path / "added", {"d1": first})
    r = CliRunner().invoke(cli, ["adapters", "add", str(added), f"d2={second}", "--base", str(tiny_base)])
    assert r.exit_code == 0, r.output
    got, want = lora_edge.load(added).forward(IDS, "d2"), lora_edge.load(both).forward(IDS, "d2")
    assert np.abs(got - want).max() <= 1e-6
