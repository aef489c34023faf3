"""`lora-edge verify`: every figure present and right on tiny models; thresholds set the exit code."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from lora_edge.cli import cli
from lora_edge.compile.verify import compare_logits, effect_retained

FIELDS = {"adapter", "tokens", "max_abs_diff", "mean_abs_diff", "kl", "top1", "top1_clear", "clear_positions", "ppl_reference",
          "ppl_package", "ppl_increase", "effect_cosine", "effect_norm_ratio", "greedy_tokens", "greedy_prefix",
          "greedy_reference", "greedy_package"}  # fmt: skip


def test_compare_logits_against_hand_computed_values():
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.0, 3.0]])
    pkg = np.array([[2.0, 0.0, 0.0], [0.0, 0.9, 1.0], [0.0, 0.0, 3.0]])
    ids = np.array([0, 1, 2])
    f = compare_logits(ref, pkg, ids, margin=0.5)
    assert f["top1"] == pytest.approx(200 / 3) and f["clear_positions"] == 2 and f["top1_clear"] == 100.0
    assert f["max_abs_diff"] == pytest.approx(0.1)
    ls = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    assert f["ppl_reference"] == pytest.approx(math.exp(-(ls[0, 1] + ls[1, 2]) / 2))
    cos, ratio = effect_retained(ref, np.zeros_like(ref), 2 * ref, np.zeros_like(ref))
    assert cos == pytest.approx(1.0) and ratio == pytest.approx(2.0)


@pytest.fixture(scope="module")
def small_pkg(tiny_base, tiny_adapters, tmp_path_factory):
    from lora_edge.config import AdapterSpec, ExportConfig, QuantConfig, WeightType
    from lora_edge.compile.pipeline import export

    out = tmp_path_factory.mktemp("v") / "pkg"
    specs = (AdapterSpec("qv", tiny_adapters["qv_r4"]), AdapterSpec("pat", tiny_adapters["patterns"]))
    export(ExportConfig(base=tiny_base, output=out, adapters=specs, quant=QuantConfig(weights=WeightType.INT4)))
    return out


def test_verify_json_has_every_figure(small_pkg):
    r = CliRunner().invoke(cli, ["verify", str(small_pkg), "--json", "--greedy-tokens", "8", "--max-tokens", "200"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{") :])
    assert report["passed"] is True and report["mode"] == "branch" and report["quantization"]["weights"] == "int4"
    rows = {row["adapter"]: row for row in report["results"]}
    assert set(rows) == {None, "qv", "pat"}
    for row in rows.values():
        assert FIELDS <= set(row)
        assert 0 <= row["top1"] <= 100 and row["kl"] >= 0 and row["ppl_reference"] > 1 and row["tokens"] == report["text_tokens"]
        assert row["max_abs_diff"] > 0  # int4 is not exact
    assert rows[None]["effect_cosine"] is None
    assert -1 <= rows["qv"]["effect_cosine"] <= 1 and rows["qv"]["effect_norm_ratio"] > 0


def test_verify_thresholds_fail_with_exit_1(small_pkg):
    r = CliRunner().invoke(cli, ["verify", str(small_pkg), "--greedy-tokens", "0", "--max-tokens", "100", "--max-ppl-increase", "-50"])
    assert r.exit_code == 1
    assert "FAILED" in r.output and "exceeds --max-ppl-increase" in r.output


def test_verify_fp32_package_is_exact(tiny_package):
    r = CliRunner().invoke(cli, ["verify", str(tiny_package), "--json", "--adapter", "patterns", "--greedy-tokens", "16",
                                 "--min-top1", "100", "--max-ppl-increase", "0.01"])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{") :])
    for row in report["results"]:
        assert row["max_abs_diff"] < 1e-4 and row["greedy_prefix"] == 16
    pat = next(row for row in report["results"] if row["adapter"] == "patterns")
    assert pat["effect_cosine"] > 0.9999 and abs(pat["effect_norm_ratio"] - 1) < 1e-4


def test_verify_user_errors(small_pkg, tmp_path):
    r = CliRunner().invoke(cli, ["verify", str(small_pkg), "--adapter", "nope"])
    assert r.exit_code == 2 and "has no adapter 'nope'" in r.output
    r = CliRunner().invoke(cli, ["verify", str(small_pkg), "--reference", str(tmp_path)])
    assert r.exit_code == 2 and "not a model directory" in r.output
