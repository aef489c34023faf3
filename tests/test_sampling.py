"""Generation options with transformers' semantics: the logits processors against transformers' own on the same
logits, seeds, stop strings, conversations; greedy stays the default and exact."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import lora_edge
from lora_edge.cli import cli
from lora_edge.errors import RuntimeInputError
from lora_edge.runtime.sampling import Sampling

CONFIGS = [
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, top_k=5),
    dict(do_sample=True, top_p=0.9),
    dict(do_sample=True, min_p=0.1),
    dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
    dict(repetition_penalty=1.5),  # greedy with a penalty
]


def _transformers(config: dict, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """transformers' processors in the order its generate() applies them."""
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)  # fmt: skip

    procs = []
    if config.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(config["repetition_penalty"]))
    if config.get("do_sample"):
        if config.get("temperature", 1.0) != 1.0:
            procs.append(TemperatureLogitsWarper(config["temperature"]))
        if config.get("top_k"):
            procs.append(TopKLogitsWarper(config["top_k"]))
        if config.get("top_p", 1.0) < 1.0:
            procs.append(TopPLogitsWarper(config["top_p"]))
        if config.get("min_p"):
            procs.append(MinPLogitsWarper(config["min_p"]))
    out = torch.tensor(scores)
    for p in procs:
        out = p(torch.tensor(ids), out)
    return out.numpy()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "do_sample"))
def test_processors_match_transformers(config):
    rng = np.random.default_rng(0)
    scores = (3 * rng.standard_normal((4, 200))).astype(np.float32)
    ids = rng.integers(0, 200, (4, 12))
    got = Sampling(**config).process(scores, ids.tolist())
    want = _transformers(config, ids, scores)
    assert np.array_equal(np.isinf(got), np.isinf(want))  # the same tokens removed
    assert np.allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6, atol=1e-6)
    assert np.isinf(got).any() or config.get("repetition_penalty") or config.get("temperature")  # (the case filters)


def test_seeds_repeat_and_greedy_is_the_default(tiny_package):
    model = lora_edge.load(tiny_package)
    prompt = [5, 17, 42, 99]
    greedy = model.generate_ids(prompt, "qv_r4", 12, 12)
    assert model.generate_ids(prompt, "qv_r4", 12, 12, sampling=Sampling()) == greedy
    hot = Sampling(do_sample=True, temperature=1.5, seed=3)
    first = model.generate_ids(prompt, "qv_r4", 12, 12, sampling=hot)
    assert model.generate_ids(prompt, "qv_r4", 12, 12, sampling=hot) == first
    others = {tuple(model.generate_ids(prompt, "qv_r4", 12, 12, sampling=Sampling(do_sample=True, temperature=1.5, seed=s))[0])
              for s in range(4, 8)}  # fmt: skip
    assert len(others | {tuple(first[0])}) > 1
    batch = model.generate_ids_batch([prompt, [7, 3]], "qv_r4", 8, 8, sampling=hot)
    assert batch[0] == model.generate_ids(prompt, "qv_r4", 8, 8, sampling=hot)  # row 0 samples alike alone and batched


def test_stop_strings_end_the_text_and_are_not_returned(tiny_package):
    model = lora_edge.load(tiny_package)
    full = model.generate("hello", "qv_r4", max_new_tokens=20, min_new_tokens=20, chat=False)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and stop in full
    result = model.generate("hello", "qv_r4", max_new_tokens=20, min_new_tokens=20, chat=False, stop=[stop], return_result=True)
    assert result.finish_reason == "stop" and result.text == full[: full.index(stop)]
    streamed = "".join(model.stream("hello", "qv_r4", max_new_tokens=20, min_new_tokens=20, chat=False, stop=[stop]))
    assert streamed == result.text


def _sentencepiece_style():
    """A small BPE with sentencepiece's Metaspace and byte fallback, whose decoder drops a text's leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    t.train_from_iterator(["Snow is frozen water. The capital of Italy is Rome. naïve café ❄️ 雪"] * 50,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials))  # fmt: skip
    return t


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_streamed_pieces_are_the_whole_decoded_text(kind):
    """Pieces decodes a few tokens per step; what it sends, joined, is the whole token list decoded at once up to the
    first stop string: random ids, text cut anywhere (inside multi-byte characters), special tokens in between."""
    import random

    from conftest import real_gguf

    from lora_edge.runtime.decoder import Pieces, stop_at

    if kind == "byte-level":
        from tokenizers import Tokenizer

        from lora_edge.compile.models.gguf_tokenizer import tokenizer_files_from_gguf

        tok = Tokenizer.from_str(tokenizer_files_from_gguf(real_gguf())["tokenizer.json"].decode())  # SmolLM2's
    else:
        tok = _sentencepiece_style()

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=True)

    text = tok.encode("Snow ❄️ is frozen water — 雪は凍った水です. Ça va? naïve café 🙂 and the capital is Rome").ids
    rng = random.Random(0)
    for trial in range(200):
        if trial % 2:
            ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 50))]
        else:
            ids = text[: rng.randrange(1, len(text))] + [0, 1, 2] + text[:5]
        stops = tuple(rng.sample(["is", "雪", "🙂", " c", "Rome", "xyz"], k=rng.randrange(0, 3)))
        pieces, sent, stopped = Pieces(decode, stops), [], False
        for i in range(1, len(ids) + 1):
            piece, stopped = pieces.step(ids[:i])
            sent.append(piece)
            if stopped:
                break
        whole = decode(ids[:i])
        cut = stop_at(whole, stops)
        assert "".join(sent) + ("" if stopped else pieces.rest(ids[:i])) == (whole if cut is None else whole[:cut])


def test_a_conversation_is_rendered_by_the_chat_template(tiny_package, tiny_base):
    from transformers import AutoTokenizer

    model = lora_edge.load(tiny_package)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is snow?"}]  # fmt: skip
    want = AutoTokenizer.from_pretrained(tiny_base).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)  # (a BatchEncoding in newer transformers)
    assert model.tokenizer.encode(messages, chat=True) == want
    result = model.generate(messages, "qv_r4", max_new_tokens=5, min_new_tokens=5, return_result=True)
    assert result.prompt_tokens == len(want) and result.token_ids == model.generate_ids(want, "qv_r4", 5, 5)[0]


@pytest.mark.parametrize("options, needle", [
    (dict(temperature=0), "temperature must be > 0"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(seed=-2), "seed must be a non-negative integer"),
    (dict(beams=4), "unknown generation option 'beams'"),
])  # fmt: skip
def test_bad_options_are_one_line(tiny_package, options, needle):
    with pytest.raises(RuntimeInputError, match=None) as exc:
        lora_edge.load(tiny_package).generate("hi", max_new_tokens=2, **options)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(RuntimeInputError, match="message 0 must be"):
        lora_edge.load(tiny_package).generate([{"role": "robot", "content": "x"}])


def test_run_samples_from_the_cli(tiny_package):
    args = ["run", str(tiny_package), "-p", "hello", "-n", "6", "-a", "qv_r4", "--do-sample", "--temperature", "1.4", "--seed", "5"]
    first, again = CliRunner().invoke(cli, args), CliRunner().invoke(cli, args)
    assert first.exit_code == 0 and first.output == again.output
    bad = CliRunner().invoke(cli, [*args, "--top-p", "0"])
    assert bad.exit_code == 2 and "top_p must be in (0, 1]" in bad.output
