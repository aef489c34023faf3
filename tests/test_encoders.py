"""BERT-style encoders against PyTorch + PEFT on tiny random models built from config: BertModel
(feature extraction), BertForSequenceClassification and RobertaForSequenceClassification (their
adapters replace the classification head: PEFT's modules_to_save), fused and reference graphs, branch
and merge, padded batches. Tolerance conftest.FP32_TOL (1e-4) as for decoders (float32 on both sides, observed
~1e-6)."""

from __future__ import annotations

import numpy as np
import pytest

import lora_edge
from conftest import FP32_TOL, MERGED_TOL, make_tokenizer, vary_zero_vectors
from lora_edge.config import AdapterSpec, ExportConfig, Mode
from lora_edge.compile.pipeline import export

KINDS = {
    "bert": ("BertConfig", "AutoModel", {}),
    "bert_cls": ("BertConfig", "AutoModelForSequenceClassification", {"num_labels": 3}),
    "roberta_cls": ("RobertaConfig", "AutoModelForSequenceClassification", {"num_labels": 2, "pad_token_id": 1}),
}


def make_encoder(root, kind: str, seed: int = 0):
    import torch
    import transformers

    config_cls, auto, extra = KINDS[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, max_position_embeddings=130, type_vocab_size=2, **extra)  # fmt: skip
    model = getattr(transformers, auto).from_config(cfg).eval()
    vary_zero_vectors(model)  # biases that count
    model.save_pretrained(root)
    make_tokenizer(root, 300)
    return root


def make_encoder_adapter(base, out, kind: str, seed: int, **kw):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = getattr(transformers, KINDS[kind][1]).from_pretrained(base)
    task = {"task_type": "SEQ_CLS"} if kind.endswith("_cls") else {}
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **task, **kw))
    with torch.no_grad():  # "train": move the LoRA B matrices and the saved classification head
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


class EncoderOracle:
    def __init__(self, base, kind: str, adapters: dict) -> None:
        self.base, self.kind, self.adapters, self.cache = base, kind, adapters, {}

    def __call__(self, ids, mask, adapter, merge: bool = False):
        import torch
        import transformers
        from peft import PeftModel

        key = (adapter, merge)
        if key not in self.cache:
            m = getattr(transformers, KINDS[self.kind][1]).from_pretrained(self.base).eval()
            if adapter:
                m = PeftModel.from_pretrained(m, str(self.adapters[adapter])).eval()
                m = m.merge_and_unload() if merge else m
            self.cache[key] = m
        with torch.no_grad():
            out = self.cache[key](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        return out.hidden_states[-1].numpy(), (out.logits.numpy() if hasattr(out, "logits") else out.pooler_output.numpy())


ADAPTERS = {
    "bert": {"qv": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
             "all_dora": dict(r=2, lora_alpha=4, target_modules=["query", "key", "value", "dense"], use_dora=True),
             "rslora_pat": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["key", "dense"], rank_pattern={"intermediate.dense": 6})},
    "bert_cls": {"cls_qkv": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"]),
                 "cls_dense": dict(r=2, lora_alpha=2, target_modules=["attention.output.dense", "intermediate.dense"])},
    "roberta_cls": {"cls_qv": dict(r=4, lora_alpha=8, target_modules=["query", "value"])},
}  # fmt: skip


@pytest.fixture(scope="module", params=list(KINDS))
def encoder(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    base = make_encoder(root / "base", kind, seed=2)
    ads = {n: make_encoder_adapter(base, root / n, kind, i + 3, **kw) for i, (n, kw) in enumerate(ADAPTERS[kind].items())}
    pkgs = {}
    for fused in (True, False):
        out = root / ("fused" if fused else "reference")
        export(ExportConfig(base=base, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in ads.items()), attention="fused" if fused else "reference"))
        pkgs[fused] = lora_edge.load(out)
    return kind, base, ads, pkgs, EncoderOracle(base, kind, ads)


def _batch(kind):
    rng = np.random.RandomState(4)
    ids = rng.randint(5, 300, (2, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # the second sequence is padded
    if kind.startswith("roberta"):
        ids[1, 7:] = 1  # RoBERTa's padding token (position ids skip it)
    return ids, mask


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_encoder_matches_peft(encoder, fused):
    kind, _, ads, pkgs, oracle = encoder
    m = pkgs[fused]
    assert isinstance(m, lora_edge.runtime.EncoderModel)
    ids, mask = _batch(kind)
    for a in (None, *ads, None):  # and back: switching leaves nothing behind
        out = m.forward(ids, a, attention_mask=mask)
        hidden, logits = oracle(ids, mask, a)
        keep = mask.astype(bool)
        assert np.abs(out["last_hidden_state"][keep] - hidden[keep]).max() <= FP32_TOL, a
        assert np.abs(out.get("logits", out.get("pooler_output")) - logits).max() <= FP32_TOL, a
    if kind.endswith("_cls"):  # the adapters' replaced heads are in use: without them the logits differ
        a = next(iter(ads))
        assert np.abs(m.forward(ids, a, attention_mask=mask)["logits"] - oracle(ids, mask, None)[1]).max() > 100 * FP32_TOL


def test_encoder_merge_matches_peft(encoder, tmp_path):
    kind, base, ads, _, oracle = encoder
    for name, path in ads.items():
        out = tmp_path / name
        export(ExportConfig(base=base, output=out, adapters=(AdapterSpec(name, path),), mode=Mode.MERGE))
        ids, mask = _batch(kind)
        got = lora_edge.load(out).forward(ids, attention_mask=mask)
        hidden, logits = oracle(ids, mask, name)
        keep = mask.astype(bool)
        assert np.abs(got["last_hidden_state"][keep] - hidden[keep]).max() <= MERGED_TOL, name
        assert np.abs(got.get("logits", got.get("pooler_output")) - logits).max() <= MERGED_TOL, name


def test_encoder_runtime_helpers(encoder):
    """classify / embed, and `lora-edge run` on an encoder package: it shows those (an encoder does not
    generate), one row per adapter, the same numbers as the library."""
    from click.testing import CliRunner

    from lora_edge.cli import cli

    kind, _, ads, pkgs, _ = encoder
    m = pkgs[True]
    a = next(iter(ads))
    if kind.endswith("_cls"):
        p = m.classify(["snow is cold", "pirates sail the seas"], a)
        assert p.shape == (2, m.num_labels) and np.allclose(p.sum(1), 1)
        shown = {n: [f"{x:.3f}" for x in m.classify(["snow is cold"], n)[0]] for n in (None, a)}
    else:
        e = m.embed(["snow is cold", "pirates"], None)
        assert e.shape == (2, 64) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
        shown = {n: [f"{x:+.3f}" for x in m.embed(["snow is cold"], n)[0][:8]] for n in (None, a)}
    assert shown[None] != shown[a]
    r = CliRunner().invoke(cli, ["run", str(m.root), "--prompt", "snow is cold", "-a", "none", "-a", a])
    assert r.exit_code == 0, r.output
    rows = [ln.split("|") for ln in r.output.strip().splitlines() if "|" in ln]
    assert [row[0].strip() for row in rows] == ["none", a]
    for (_, text), n in zip(rows, (None, a)):
        assert all(x in text for x in shown[n]), (n, text)


def test_modules_to_save_outside_a_head_is_refused(tmp_path):
    import json

    base = make_encoder(tmp_path / "base", "bert", seed=1)
    ad = make_encoder_adapter(base, tmp_path / "ad", "bert", 1, r=2, target_modules=["query"], modules_to_save=["intermediate.dense"])
    with pytest.raises(lora_edge.UnsupportedFeatureError, match="modules_to_save"):
        export(ExportConfig(base=base, output=tmp_path / "pkg", adapters=(AdapterSpec("x", ad),)))
    assert json.loads((ad / "adapter_config.json").read_text())["modules_to_save"] == ["intermediate.dense"]
    assert not (tmp_path / "pkg").exists()
