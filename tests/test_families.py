"""Every decoder family against PyTorch + PEFT on tiny random models built from config: Mistral,
Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm, head_dim != hidden/heads), Phi-3 (LoRA on the fused
qkv_proj / gate_up_proj modules), Gemma ((1+w) norms, scaled embeddings, GELU-tanh) and Gemma 2
(+ soft-capping, sandwich norms, sliding window), GPT-2 (Conv1D / fan_in_fan_out, LayerNorm, learned
positions, its own module names), with no adapter, an adapter on all attention and MLP
projections, rank/alpha patterns, and rsLoRA; fused and reference graphs in branch mode, and merge
mode. Also DoRA and embedding LoRA. Tolerance conftest.FP32_TOL (1e-4) as for Llama: float32 on
both sides, observed ~1e-6."""

from __future__ import annotations

import numpy as np
import pytest

import lora_edge
from conftest import FP32_TOL, MERGED_TOL, PROMPT_IDS, Oracle, make_adapter, make_tiny_base
from lora_edge.config import AdapterSpec, ExportConfig, Mode
from lora_edge.compile.pipeline import export

FAMILIES = ["mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt2"]
ADAPTERS = {
    "all_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 5, r"layers\.1\.self_attn\.v_proj": 3}, alpha_pattern={"down_proj": 9}),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
}  # fmt: skip


PHI3_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


GPT2_NAMES = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "attn.c_proj", "gate_proj": "c_fc",
              "up_proj": "c_fc", "down_proj": "mlp.c_proj"}  # fmt: skip


def for_family(kw: dict, family: str) -> dict:
    """Phi-3 has fused q/k/v and gate/up modules, GPT-2 its own names (c_attn, c_proj, c_fc; Conv1D
    layers, so fan_in_fan_out): the same adapter recipes target those instead."""
    if family == "gpt2":
        out = dict(kw, target_modules=sorted({GPT2_NAMES[t] for t in kw["target_modules"]}), fan_in_fan_out=True)
        if "rank_pattern" in kw:
            out["rank_pattern"] = {"attn.c_proj": 5, r"h\.1\.attn\.c_attn": 3}
        if "alpha_pattern" in kw:
            out["alpha_pattern"] = {"mlp.c_proj": 9}
        return out
    if family != "phi3":
        return kw
    rename = lambda s: next((s.replace(k, v) for k, v in PHI3_NAMES.items() if k in s), s)  # noqa: E731
    out = dict(kw, target_modules=sorted({PHI3_NAMES.get(t, t) for t in kw["target_modules"]}))
    for key in ("rank_pattern", "alpha_pattern"):
        if key in kw:
            out[key] = {rename(k): v for k, v in kw[key].items()}
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = make_tiny_base(root / "base", request.param, seed=3)
    adapters = {n: make_adapter(base, root / n, seed=i + 11, **for_family(kw, request.param)) for i, (n, kw) in enumerate(ADAPTERS.items())}
    packages = {}
    for fused in (True, False):
        out = root / ("fused" if fused else "reference")
        export(ExportConfig(base=base, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in adapters.items()), attention="fused" if fused else "reference"))
        packages[fused] = lora_edge.load(out, threads=1)
    return request.param, base, adapters, packages, Oracle(base, adapters)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_family_branch_matches_peft(family, fused, adapter):
    name, _, _, packages, oracle = family
    m = packages[fused]
    assert m.manifest.spec.architecture.lower().startswith(name)
    ids = np.random.RandomState(1).randint(0, 300, (1, 13))
    assert np.abs(m.forward(ids, adapter) - oracle.logits(ids, adapter)).max() <= FP32_TOL
    assert m.generate_ids(PROMPT_IDS, adapter, 12, 12)[0] == oracle.greedy(PROMPT_IDS, adapter, 12)  # the KV-cache path


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_family_merge_matches_peft(family, adapter, tmp_path):
    _, base, adapters, _, oracle = family
    out = tmp_path / "merged"
    export(ExportConfig(base=base, output=out, adapters=(AdapterSpec(adapter, adapters[adapter]),), mode=Mode.MERGE))
    ids = np.random.RandomState(2).randint(0, 300, (1, 11))
    got = lora_edge.load(out).forward(ids)
    assert np.abs(got - oracle.logits(ids, adapter, merge=True)).max() <= FP32_TOL  # PEFT's merge_and_unload
    assert np.abs(got - oracle.logits(ids, adapter)).max() <= MERGED_TOL  # PEFT's unmerged forward


def test_family_specifics_are_in_the_manifest(family):
    name, _, _, packages, _ = family
    spec = packages[True].manifest.spec
    if name == "qwen3":
        assert spec.qk_norm and spec.head_dim == 24
    if name == "gemma2":  # soft-capping on, sliding window caps the context
        assert (spec.attn_softcap, spec.final_softcap, spec.max_position_embeddings) == (5.0, 3.0, 200)
        assert spec.sandwich_norms and spec.norm_offset == 1.0 and spec.activation == "gelu_tanh"
    if name == "phi3":
        assert any(s.name.endswith("qkv_proj") and len(s.parts) == 1 for s in packages[True].manifest.slots)


def test_biases_and_norm_weights_are_computed(family):
    """Every family's linear biases (Qwen2's q/k/v, GPT-2's) and per-channel norm weights (Gemma's) are in
    use: the package matches PyTorch, and PyTorch without them differs far beyond the tolerance, so the
    parity tests above fail for a graph that drops or misplaces one."""
    import copy

    import torch

    name, _, _, packages, oracle = family
    ids = np.random.RandomState(9).randint(0, 300, (1, 10))
    for fused, m in packages.items():
        assert np.abs(m.forward(ids) - oracle.logits(ids, None)).max() <= FP32_TOL, fused
    checked = set()
    for kind in ("bias", "norm"):
        stripped = copy.deepcopy(oracle.model(None))
        params = [p for n, p in stripped.named_parameters()
                  if p.ndim == 1 and not bool((p == p[0]).all()) and (n.endswith(".bias") == (kind == "bias"))]  # fmt: skip
        if not params:  # none in this family, or all equal (a graph ignoring those is off by their value)
            continue
        with torch.no_grad():
            for p in params:  # each to its mean: what a graph computes that has one value for the whole vector
                p.fill_(float(p.mean()))
            without = stripped(torch.tensor(ids)).logits.numpy()
        assert np.abs(packages[True].forward(ids) - without).max() > 100 * FP32_TOL, kind
        checked.add(kind)
    assert checked >= {"qwen2": {"bias"}, "gpt2": {"bias"}, "gemma": {"norm"}, "gemma2": {"norm"}}.get(name, set())


def test_sliding_window_caps_the_context(tmp_path):
    """Within the window, sliding-window attention is full attention: the package's context is the window."""
    base = make_tiny_base(tmp_path / "base", "mistral_window", seed=4)
    ad = make_adapter(base, tmp_path / "ad", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    export(ExportConfig(base=base, output=tmp_path / "pkg", adapters=(AdapterSpec("a", ad),)))
    m, oracle = lora_edge.load(tmp_path / "pkg"), Oracle(base, {"a": ad})
    assert m.max_length == 48
    ids = np.random.RandomState(3).randint(0, 300, (1, 48))
    for a in (None, "a"):
        assert np.abs(m.forward(ids, a) - oracle.logits(ids, a)).max() <= FP32_TOL
    with pytest.raises(lora_edge.RuntimeInputError, match="context of 48"):
        m.forward(np.zeros((1, 49), np.int64))


@pytest.mark.parametrize("kind", ["gqa_tied", "qwen2"])
def test_dora_branch_and_merge_match_peft(tmp_path, kind):
    """DoRA: the branch plus the per-channel magnitude scale g = m / ||W + sBA||, a constant vector per
    adapter bound like A and B; switchable with a plain LoRA adapter on the same graph; and merged."""
    base = make_tiny_base(tmp_path / "base", kind, seed=6)
    dora = make_adapter(base, tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])  # fmt: skip
    plain = make_adapter(base, tmp_path / "plain", seed=4, r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"])
    out = tmp_path / "pkg"
    export(ExportConfig(base=base, output=out, adapters=(AdapterSpec("dora", dora), AdapterSpec("plain", plain))))
    m, oracle = lora_edge.load(out), Oracle(base, {"dora": dora, "plain": plain})
    assert m.manifest.adapters["dora"].use_dora and any(s.lora_M for s in m.manifest.slots)
    ids = np.random.RandomState(5).randint(0, 300, (1, 10))
    for a in ("dora", None, "plain", "dora"):
        assert np.abs(m.forward(ids, a) - oracle.logits(ids, a)).max() <= FP32_TOL, a
    assert np.abs(m.forward(ids, "dora") - oracle.logits(ids, "dora")).max() <= FP32_TOL
    # the magnitude matters: without it (plain LoRA on the same A, B) the logits differ clearly
    assert np.abs(oracle.logits(ids, "dora") - m.forward(ids, None)).max() > 100 * FP32_TOL
    merged = tmp_path / "merged"
    export(ExportConfig(base=base, output=merged, adapters=(AdapterSpec("dora", dora),), mode=Mode.MERGE))
    assert np.abs(lora_edge.load(merged).forward(ids) - oracle.logits(ids, "dora")).max() <= MERGED_TOL


@pytest.mark.parametrize("kind", ["gqa_tied", "mha_untied", "qwen3"])
def test_embedding_lora_branch_and_merge_match_peft(tmp_path, kind):
    """LoRA on the token embedding (lora_embedding_A/B): A's rows gathered by token id, then @ B; the
    tied lm_head is not affected (as in PEFT's forward), and merging unties it rather than change it."""
    base = make_tiny_base(tmp_path / "base", kind, seed=8)
    ad = make_adapter(base, tmp_path / "emb", seed=5, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"])
    out = tmp_path / "pkg"
    export(ExportConfig(base=base, output=out, adapters=(AdapterSpec("emb", ad),)))
    m, oracle = lora_edge.load(out), Oracle(base, {"emb": ad})
    assert any(s.name == "model.embed_tokens" for s in m.manifest.slots)
    ids = np.random.RandomState(6).randint(0, 300, (1, 12))
    for a in (None, "emb"):
        assert np.abs(m.forward(ids, a) - oracle.logits(ids, a)).max() <= FP32_TOL, a
    prompt = [3, 9, 27, 81]
    assert m.generate_ids(prompt, "emb", 8, 8)[0] == oracle.greedy(prompt, "emb", 8)
    merged = tmp_path / "merged"
    export(ExportConfig(base=base, output=merged, adapters=(AdapterSpec("emb", ad),), mode=Mode.MERGE))
    assert np.abs(lora_edge.load(merged).forward(ids) - oracle.logits(ids, "emb")).max() <= MERGED_TOL


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_match_peft(tmp_path, bias):
    """PEFT bias="lora_only"/"all" trains the linear layers' biases (here Qwen2's q/k/v); the change of
    the bias is an adapter input like A and B, so it switches with the adapter, and merges exactly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_base(tmp_path / "base", "qwen2", seed=7)
    torch.manual_seed(3)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        bias=bias, target_modules=["q_proj", "o_proj"]))  # fmt: skip
    with torch.no_grad():  # "training": move every trainable bias
        for n, p in pm.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "ad")
    plain = make_adapter(base, tmp_path / "plain", seed=2, r=2, lora_alpha=2, target_modules=["v_proj"])
    out = tmp_path / "pkg"
    export(ExportConfig(base=base, output=out, adapters=(AdapterSpec("b", tmp_path / "ad"), AdapterSpec("plain", plain))))
    m, oracle = lora_edge.load(out), Oracle(base, {"b": tmp_path / "ad", "plain": plain})
    assert any(s.lora_bias for s in m.manifest.slots)
    ids = np.random.RandomState(7).randint(0, 300, (1, 9))
    for a in ("b", None, "plain", "b"):
        assert np.abs(m.forward(ids, a) - oracle.logits(ids, a)).max() <= FP32_TOL, a
    merged = tmp_path / "merged"
    export(ExportConfig(base=base, output=merged, adapters=(AdapterSpec("b", tmp_path / "ad"),), mode=Mode.MERGE))
    assert np.abs(lora_edge.load(merged).forward(ids) - oracle.logits(ids, "b")).max() <= MERGED_TOL


@pytest.mark.parametrize("kind", ["gqa_tied", "mha_untied", "gpt2"])
def test_modules_to_save_lm_head_branch_and_merge_match_peft(tmp_path, kind):
    """An adapter that replaces the output head (modules_to_save=["lm_head"], e.g. after adding tokens
    or tuning the head): the head's weight is a graph input, the base's by default and the adapter's copy
    when bound, switchable with a plain adapter; a tied head stops sharing the embedding's codes."""
    base = make_tiny_base(tmp_path / "base", kind, seed=2)
    kw = dict(target_modules=["c_attn"], fan_in_fan_out=True) if kind == "gpt2" else dict(target_modules=["q_proj"])
    head = make_adapter(base, tmp_path / "head", seed=2, r=2, modules_to_save=["lm_head"], **kw)
    plain = make_adapter(base, tmp_path / "plain", seed=3, r=2, **kw)
    export(ExportConfig(base=base, output=tmp_path / "pkg", adapters=(AdapterSpec("head", head), AdapterSpec("plain", plain))))
    m, oracle = lora_edge.load(tmp_path / "pkg"), Oracle(base, {"head": head, "plain": plain})
    assert m.manifest.adapters["head"].modules_to_save == ("lm_head",)
    ids = np.random.RandomState(8).randint(0, 300, (1, 9))
    for a in ("head", None, "plain", "head"):
        assert np.abs(m.forward(ids, a) - oracle.logits(ids, a)).max() <= FP32_TOL, a
    export(ExportConfig(base=base, output=tmp_path / "merged", adapters=(AdapterSpec("head", head),), mode=Mode.MERGE))
    assert np.abs(lora_edge.load(tmp_path / "merged").forward(ids) - oracle.logits(ids, "head")).max() <= MERGED_TOL


def test_modules_to_save_outside_the_heads_is_refused_by_name(tmp_path):
    """Replacing, say, a whole MLP layer per adapter is not supported: lora-edge says so instead of
    dropping it."""
    base = make_tiny_base(tmp_path / "base", "mha_untied", seed=2)
    ad = make_adapter(base, tmp_path / "ad", seed=2, r=2, target_modules=["q_proj"], modules_to_save=["layers.0.mlp.down_proj"])
    with pytest.raises(lora_edge.UnsupportedFeatureError, match="replaces only output and classification heads"):
        export(ExportConfig(base=base, output=tmp_path / "pkg", adapters=(AdapterSpec("x", ad),)))
    assert not (tmp_path / "pkg").exists()
