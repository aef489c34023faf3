"""Quantization: the numpy reference, ONNX Runtime's kernels, and tiny-model parity per quant level.

Tolerances:
- accuracy level 0 (MatMulNBits dequantizes and computes in float32) against PyTorch running the
  *dequantized* weights: 1e-4, the float32 tolerance, because both compute the same products.
- accuracy level 4 (activations quantized to int8 per block inside the kernel): each activation is
  rounded to 1/254 of its block's max, so a dot product moves by ~0.2-0.4% of its magnitude; over a
  few layers that is bounded here by 2% of the logits' range, and top-1 must agree where the
  reference has a clear winner.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lora_edge
from lora_edge.config import AdapterSpec, ExportConfig, Mode, QuantConfig, WeightType
from lora_edge.compile.pipeline import export
from lora_edge.compile.quant.blocks import dequantize, pack, quantize, unpack
from conftest import QUANTS, quantized_reference

RNG = np.random.RandomState(0)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_is_onnxruntime_s_own_rtn(bits):
    """Our numpy RTN gives byte-identical codes to ONNX Runtime's C++ quantizer (the tool's golden)."""
    from onnxruntime.capi import _pybind_state as C

    w = (RNG.randn(48, 96) * 0.1).astype(np.float32)  # (N, K)
    n, k, block = 48, 96, 32
    kb = k // block
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb * bits + 7) // 8), np.uint8)
    getattr(C, f"quantize_matmul_{bits}bits")(packed, np.ascontiguousarray(w.T), scales, zp, block, n, k, False)
    q = quantize(w, bits, block, zero="int", algo="rtn")
    assert np.array_equal(q.codes, packed) and np.array_equal(q.zero_points, zp)
    np.testing.assert_allclose(q.scales, scales, rtol=1e-6)


def test_pack_roundtrip_and_nibble_order():
    q = np.array([[1, 2, 3, 15, 0]], np.uint8)
    p = pack(q, 4)
    assert p.tolist() == [[0x21, 0xF3, 0x00]]  # low nibble first, odd length padded
    assert unpack(p, 4, 5).tolist() == q.tolist()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero", ["int", "none", "float"])
def test_search_never_worse_than_rtn(bits, zero):
    w = (RNG.standard_t(3, size=(64, 256)) * 0.05).astype(np.float32)  # heavy tails, like real weights
    err = {a: ((dequantize(quantize(w, bits, 32, zero, a)) - w) ** 2).reshape(64, -1, 32).sum(-1) for a in ("rtn", "search")}
    assert (err["search"] <= err["rtn"] + 1e-12).all()
    if bits == 4:  # at 8 bits clipping rarely pays; at 4 bits it must
        assert err["search"].sum() < 0.99 * err["rtn"].sum()


def _matmul_nbits_model(qt, accuracy_level):
    inputs = ["x", "codes", "scales"] + (["zp"] if qt.zero_points is not None else [])
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=qt.k, N=qt.n, bits=qt.bits,
                            block_size=qt.block, accuracy_level=accuracy_level)  # fmt: skip
    inits = [numpy_helper.from_array(qt.codes, "codes"), numpy_helper.from_array(qt.scales, "scales")]
    if qt.zero_points is not None:
        inits.append(numpy_helper.from_array(qt.zero_points, "zp"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", qt.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", qt.n])], initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero", ["int", "none"])
@pytest.mark.parametrize("k, block", [(64, 32), (80, 32), (96, 16), (128, 128)])
def test_matmul_nbits_computes_the_dequantized_weight(bits, zero, k, block):
    """ORT's MatMulNBits on our layout == x @ dequantize(W).T (float compute), K padded or not."""
    w = (RNG.randn(24, k) * 0.2).astype(np.float32)
    qt = quantize(w, bits, block, zero)
    x = RNG.randn(5, k).astype(np.float32)
    got = _matmul_nbits_model(qt, 0).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ dequantize(qt).T, atol=1e-5, rtol=1e-5)


# -- tiny-model parity per quant level -------------------------------------------------------
# (the quant configs and the dequantized PyTorch reference are conftest's QUANTS and quantized_reference)


def test_gptq_beats_rtn_on_its_objective():
    """GPTQ minimises ||X W^T - X W_hat^T||; on correlated inputs it must beat per-block search clearly."""
    from lora_edge.compile.quant.blocks import gptq

    rng = np.random.RandomState(1)
    x = rng.randn(400, 64) @ rng.randn(64, 64) * 0.3  # correlated features, like real activations
    w = (rng.randn(32, 64) * 0.1).astype(np.float32)
    h = x.T @ x / len(x)
    out_err = {}
    for name, qt in {"search": quantize(w, 4, 32), "gptq": gptq(w, h, 4, 32), "gptq-float": gptq(w, h, 4, 32, "float")}.items():
        out_err[name] = np.linalg.norm(x @ w.T - x @ dequantize(qt).T)
    assert out_err["gptq"] < 0.8 * out_err["search"]
    assert out_err["gptq-float"] < out_err["gptq"]


@pytest.mark.parametrize("mode", ["branch", "merge"])
@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_quantized_package_computes_its_quantized_weights(tiny_base, tiny_adapters, tmp_path, quant, mode):
    import torch

    qcfg = QUANTS[quant]
    ad = tiny_adapters["all_r8_rslora"]
    out = tmp_path / "pkg"
    export(ExportConfig(base=tiny_base, output=out, adapters=(AdapterSpec("x", ad),), mode=Mode(mode), quant=qcfg))
    m = lora_edge.load(out)
    ids = np.random.RandomState(5).randint(0, 300, (2, 13))
    use = "x" if mode == "branch" else None
    ref = quantized_reference(tiny_base, qcfg, ad, merge=mode == "merge")
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    # MatMulNBits dequantizes and sums in its own order, and float offsets run as a separate correction
    # (x·W_int + blocksum(x)·C instead of x·(W_int + C)): float32 rounding in another order. On the strong
    # all_r8_rslora adapter these tiny models are ill-conditioned: PyTorch's own float32 logits differ from
    # its float64 ones by 1e-3 (int4_emb4_sym_b16); observed up to 2.6e-4 here, on logits of magnitude ~1-3.
    tol = 5e-4
    assert np.abs(m.forward(ids, adapter=use) - want).max() <= tol
    if mode == "branch":  # the same quantized base serves "no adapter"
        base_ref = quantized_reference(tiny_base, qcfg)
        with torch.no_grad():
            assert np.abs(m.forward(ids) - base_ref(torch.tensor(ids)).logits.numpy()).max() <= tol


def test_accuracy_level_4_stays_close(tiny_base, tiny_adapters, tmp_path):
    import torch

    qcfg = QuantConfig(weights=WeightType.INT4, accuracy_level=4)
    ad = tiny_adapters["qv_r4"]
    out = tmp_path / "pkg"
    export(ExportConfig(base=tiny_base, output=out, adapters=(AdapterSpec("x", ad),), quant=qcfg))
    ids = np.random.RandomState(6).randint(0, 300, (1, 24))
    with torch.no_grad():
        want = quantized_reference(tiny_base, qcfg, ad)(torch.tensor(ids)).logits.numpy()
    model = lora_edge.load(out)
    got = model.forward(ids, adapter="x")
    assert np.abs(got - want).max() <= 0.02 * (want.max() - want.min())
    part = np.partition(want, -2, -1)
    clear = part[..., -1] - part[..., -2] >= 0.5
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
    # the activations are rounded per block everywhere, as here: not by KleidiAI's per-row kernels on ARM (arm64.md)
    from lora_edge.runtime.session import session_options

    assert session_options(out, model.manifest, None, None).get_session_config_entry("mlas.disable_kleidiai") == "1"
    fp32 = export(ExportConfig(base=tiny_base, output=tmp_path / "fp32")).manifest
    with pytest.raises(RuntimeError, match="does not have configuration"):  # float packages: ONNX Runtime's choice
        session_options(tmp_path / "fp32", fp32, None, None).get_session_config_entry("mlas.disable_kleidiai")


def test_adapter_files_do_not_depend_on_the_base_quantization(tiny_base, tiny_adapters, tmp_path):
    specs = (AdapterSpec("x", tiny_adapters["patterns"]),)
    f32 = export(ExportConfig(base=tiny_base, output=tmp_path / "a", adapters=specs)).manifest
    i4 = export(ExportConfig(base=tiny_base, output=tmp_path / "b", adapters=specs, quant=QuantConfig(weights=WeightType.INT4))).manifest
    assert f32.files["adapters/x.onnx_adapter"] == i4.files["adapters/x.onnx_adapter"]
    assert i4.files["model.onnx.data"].bytes < 0.35 * f32.files["model.onnx.data"].bytes


@pytest.mark.parametrize("kwargs, needle", [
    (dict(block_size=48), "power of two"),
    (dict(block_size=512), "power of two"),
    (dict(accuracy_level=7), "accuracy level"),
    (dict(algo="magic"), "algorithm"),
    (dict(embeddings=WeightType.FP16), "fp16"),
    (dict(int8_modules=("(",)), "regular expression"),
])  # fmt: skip
def test_bad_quant_options(kwargs, needle):
    with pytest.raises(lora_edge.InputError, match=needle):
        QuantConfig(weights=WeightType.INT4, **kwargs)
