"""Execution targets on tiny models: the mobile (.ort) package matches the .onnx one, the cuda package's
float16 compute matches PyTorch within float16 precision (run here on the CPU provider), providers are
chosen and refused clearly, and ONNX Runtime GenAI loads a package, generates the same greedy tokens
and switches its .onnx_adapter files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import lora_edge
from lora_edge.cli import cli
from lora_edge.package.store import read_manifest
from lora_edge.config import AdapterSpec, ExportConfig, QuantConfig, WeightType
from lora_edge.errors import RuntimeInputError
from lora_edge.compile.pipeline import export
from conftest import PROMPT_IDS

ADAPTERS = ("qv_r4", "all_r8_rslora")
IDS = np.arange(3, 40)[None]


@pytest.fixture(scope="module")
def packages(tiny_base, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for target in ("cpu", "mobile", "cuda"):
        for q in ("fp32", "int4"):
            out[target, q] = root / f"{target}-{q}"
            # accuracy level 0 (float activations): on the CPU fallback level 4 would round activations to
            # int8, which amplifies float16's differences; CUDA's MatMulNBits computes in float16 either way
            quant = QuantConfig(weights=WeightType(q), accuracy_level=0)
            export(ExportConfig(base=tiny_base, output=out[target, q], target=target, quant=quant,
                                adapters=tuple(AdapterSpec(n, tiny_adapters[n]) for n in ADAPTERS)))  # fmt: skip
    return out


@pytest.mark.parametrize("q", ["fp32", "int4"])
def test_mobile_package_is_ort_format_and_matches_onnx(packages, q):
    mob, cpu = packages["mobile", q], packages["cpu", q]
    names = {p.name for p in mob.iterdir()}
    assert {"model.ort", "required_operators_and_types.config", "genai_config.json"} <= names
    assert "model.onnx" not in names and "model.onnx.data" not in names
    config = (mob / "required_operators_and_types.config").read_text()
    for op in ("GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"):
        assert op in config
    assert ("MatMulNBits" in config) == (q == "int4")
    m_ort, m_onnx = lora_edge.load(mob, threads=1), lora_edge.load(cpu, threads=1)
    assert m_ort.manifest.graph.file == "model.ort" and m_ort.manifest.graph.target == "mobile"
    for a in (None, *ADAPTERS):  # same kernels, same order: bit-identical
        np.testing.assert_array_equal(m_ort.forward(IDS, a), m_onnx.forward(IDS, a))
        assert m_ort.generate_ids(PROMPT_IDS, a, 8, 8) == m_onnx.generate_ids(PROMPT_IDS, a, 8, 8)
    # the adapters still switch in the .ort graph
    assert not np.allclose(m_ort.forward(IDS, ADAPTERS[0]), m_ort.forward(IDS, None))


def torch_fp16_error(oracle, adapter) -> float:
    """How far PyTorch itself moves from its float32 logits when run in float16: the yardstick."""
    import copy

    import torch

    with torch.no_grad():
        half = copy.deepcopy(oracle.model(adapter)).half()
        return float(np.abs(half(torch.tensor(IDS)).logits.float().numpy() - oracle.logits(IDS, adapter)).max())


def test_cuda_package_float16_matches_pytorch(packages, tiny_oracle):
    """float16 activations carry an 11-bit mantissa, so the error against the float32 oracle is that of
    float16 itself: PyTorch run in float16 moves these logits by 3e-3 (base) to 0.12 (the strong rank-8
    rsLoRA adapter on every projection). Ours must stay within twice PyTorch's own float16 error (+5e-3),
    and greedy tokens must not change."""
    m = lora_edge.load(packages["cuda", "fp32"], threads=1)
    assert m.manifest.graph.compute_dtype == "float16" and m.dtype == np.float16
    assert m.providers[0] == "CPUExecutionProvider"  # no CUDA here: it falls back, and says so on stderr
    for a in (None, *ADAPTERS):
        got, want = m.forward(IDS, a), tiny_oracle.logits(IDS, a)
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 2 * torch_fp16_error(tiny_oracle, a) + 5e-3, a
        assert m.generate_ids(PROMPT_IDS, a, 8, 8)[0] == tiny_oracle.greedy(PROMPT_IDS, a, 8), a
    # the adapter files hold float16 tensors for a float16 graph
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(packages["cuda", "fp32"] / "adapters" / f"{ADAPTERS[0]}.onnx_adapter")).get_parameters()
    assert {v.data_type() for v in params.values()} == {"tensor(float16)"}


def test_cuda_int4_runs_and_keeps_adapters_switchable(packages, tiny_oracle):
    """The same int4 weights computed in float16 vs float32: float16's own error (measured: 0.003-0.25).

    Within 3x PyTorch's float16 error (not 2x as for float weights): float16 rounds the dequantized int4
    weights too, and on this tiny random model rounding differences grow chaotically with depth. An equally
    exact summation order of the LoRA product (B without block-diagonal zeros) moved the strong rsLoRA
    adapter's error from 0.16 to 0.25 while the float-weight package stayed at 0.16."""
    m16, m32 = lora_edge.load(packages["cuda", "int4"], threads=1), lora_edge.load(packages["cpu", "int4"], threads=1)
    for a in (None, *ADAPTERS):
        assert np.abs(m16.forward(IDS, a) - m32.forward(IDS, a)).max() <= 3 * torch_fp16_error(tiny_oracle, a) + 5e-3, a
    assert not np.allclose(m16.forward(IDS, ADAPTERS[1]), m16.forward(IDS, None))


def test_missing_provider_is_a_clear_error(packages):
    with pytest.raises(RuntimeInputError, match="CUDAExecutionProvider.*not available"):
        lora_edge.load(packages["cpu", "fp32"], providers=["CUDAExecutionProvider"])
    r = CliRunner().invoke(cli, ["run", str(packages["cpu", "fp32"]), "-p", "hi", "--provider", "NopeExecutionProvider"])
    assert r.exit_code == 2 and "not available" in r.output


def test_genai_config_written(packages, tiny_base):
    cfg = json.loads((packages["cpu", "fp32"] / "genai_config.json").read_text())
    spec = read_manifest(packages["cpu", "fp32"]).spec
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "llama" and dec["filename"] == "model.onnx"
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    assert json.loads((packages["cuda", "fp32"] / "genai_config.json").read_text())["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


@pytest.mark.parametrize("q", ["fp32", "int4"])
def test_onnxruntime_genai_loads_package_and_switches_adapters(packages, q):
    """onnxruntime-genai (from PyPI) on a lora-edge package: same greedy tokens, same adapters. Both
    sides run one intra-op thread: int4 with an adapter is sensitive to summation order."""
    import onnxruntime_genai as og

    pkg = packages["cpu", q]
    cfg = og.Config(str(pkg))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    adapters = og.Adapters(model)
    for a in ADAPTERS:
        adapters.load(str(pkg / "adapters" / f"{a}.onnx_adapter"), a)
    ours = lora_edge.load(pkg, threads=1)

    def og_greedy(name, n=10):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(PROMPT_IDS) + n)
        gen = og.Generator(model, params)
        if name is not None:
            gen.set_active_adapter(adapters, name)
        gen.append_tokens(np.asarray(PROMPT_IDS, np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)[len(PROMPT_IDS) :]]

    outs = {}
    for a in (ADAPTERS[0], None, ADAPTERS[1], ADAPTERS[0], None):  # switching back and forth on one model
        got = og_greedy(a)
        want = ours.generate_ids(PROMPT_IDS, a, 10)[0]
        assert got == want, a
        outs.setdefault(a, got)
        assert outs[a] == got
    assert len({tuple(v) for v in outs.values()}) > 1  # the adapters change the answer
