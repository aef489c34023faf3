"""Requests for different adapters decoded in one batch (runtime.batching): rows join between steps and leave when
done, and every row's logits are those of the same request run alone.

Tolerance: 1e-5 of the logits' scale, max(1, max |logit|). A row keeps only its own adapter's columns of the stacked
A and B, so the others add exact zeros; what differs from the call alone is float32 summation order (a GEMM over a
longer, zero-padded rank, and several rows where there was one), a few ulps per operation."""

from __future__ import annotations

import numpy as np
import pytest

import lora_edge
from lora_edge.runtime.batching import Row

from conftest import REAL_ADAPTERS, real_gguf

ROW_TOL = 1e-5


def alone(model, prompt: list[int], adapter, tokens: list[int]) -> list[np.ndarray]:
    """The logits each of ``tokens`` was chosen from, the request run by itself (the package's own step function)."""
    step = model.steps(adapter, len(prompt) + len(tokens) + 1)
    out = [step(np.asarray([prompt]), len(prompt))[0]]
    for i, t in enumerate(tokens[:-1]):
        out.append(step(np.asarray([[t]]), len(prompt) + i + 1)[0])
    return out


def assert_rows_alone(model, rows: list[Row], seen: list[list[np.ndarray]], choices) -> None:
    for row, logits, choice in zip(rows, seen, choices):
        assert row.done
        want = alone(model, row.prompt, choice, row.tokens)
        assert len(logits) >= len(row.tokens)
        for got, ref in zip(logits, want):
            assert np.abs(got - ref).max() <= ROW_TOL * max(1.0, float(np.abs(ref).max()))
        greedy, _ = model.generate_ids(row.prompt, choice, row.max_new_tokens, eos_ids=row.eos_ids)
        assert row.tokens == greedy


def staggered(model, prompts, choices, new_tokens, joins) -> tuple[list[Row], list[list[np.ndarray]], int]:
    """Rows joining at the steps ``joins`` (those of one step prefilled in one call) and leaving at their own lengths;
    (rows, each row's logits, the most rows that shared a step)."""
    batch = model.batch(len(prompts), capacity=64)
    seen: list[list[np.ndarray]] = [[] for _ in prompts]
    rows = [Row(p, model._adapters.key(c), n, eos_ids=frozenset(), on_logits=seen[i].append)
            for i, (p, c, n) in enumerate(zip(prompts, choices, new_tokens))]  # fmt: skip
    peak, step = 0, 0
    while step <= max(joins) or batch.rows:
        now = [row for row, at in zip(rows, joins) if at == step]
        assert all(batch.accepts(row.key) for row in now)
        if now:
            batch.add(*now)
        peak = max(peak, len(batch.rows))
        batch.step()
        step += 1
    return rows, seen, peak


@pytest.mark.parametrize("first_length, chunk", [(256, 128), (8, 3)])
def test_mixed_rows_are_each_the_request_alone(tiny_package, monkeypatch, first_length, chunk):
    """Every adapter kind of the tiny package (rank patterns, some modules only, lm_head, a strength, a blend) and the
    base, joining at different steps and leaving at different lengths (a leaving row's place is taken by the last);
    with a cache that starts short, it grows while rows decode. With chunks of 3 tokens, a row joining alone and
    each request alone are prefilled in chunks, rows joining together (of different lengths) in one call."""
    monkeypatch.setattr("lora_edge.runtime.batching.FIRST_LENGTH", first_length)
    monkeypatch.setattr("lora_edge.runtime.loop.PREFILL_CHUNK", chunk)
    model = lora_edge.load(tiny_package, threads=1)
    assert model.manifest.graph.row_mask
    rng = np.random.default_rng(0)
    choices = [*model.adapters, None, {"qv_r4": 0.5}, {"all_r8_rslora": 0.7, "patterns": 0.4}]
    prompts = [[int(t) for t in rng.integers(3, 300, size=n)] for n in rng.integers(2, 12, size=len(choices))]
    new_tokens = [int(n) for n in rng.integers(3, 10, size=len(choices))]
    joins = [0, 0, 0, 1, 2, 2, 4, 5, 7]
    rows, seen, peak = staggered(model, prompts, choices, new_tokens, joins)
    assert peak >= 6
    assert_rows_alone(model, rows, seen, choices)


def test_generate_ids_batch_takes_an_adapter_per_prompt(tiny_package, tiny_base, tiny_adapters, tmp_path):
    """One list of adapters, one per prompt: the same answers on a package with the row mask (one batch) and on one
    exported without it (one request at a time)."""
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec, ExportConfig

    prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4], [100, 3], [42] * 5]
    choices = ["qv_r4", None, "lm_head", {"qv_r4": 0.3, "patterns": 1.0}]
    mixed = lora_edge.load(tiny_package, threads=1)
    got = mixed.generate_ids_batch(prompts, choices, max_new_tokens=6, eos_ids=frozenset())
    assert [g for g, _ in got] == [mixed.generate_ids(p, c, 6, eos_ids=frozenset())[0] for p, c in zip(prompts, choices)]
    out = tmp_path / "plain"
    export(ExportConfig(base=tiny_base, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in tiny_adapters.items()),
                        mixed_batches=False))  # fmt: skip
    plain = lora_edge.load(out, threads=1)
    assert plain.manifest.graph.row_mask is None
    batch = plain.batch(2)
    batch.add(Row(prompts[0], "qv_r4", 4, eos_ids=frozenset()))
    assert not batch.accepts("lm_head") and batch.accepts("qv_r4")  # one adapter per call without the row mask
    assert plain.generate_ids_batch(prompts, choices, max_new_tokens=6, eos_ids=frozenset()) == got
    with pytest.raises(lora_edge.RuntimeInputError, match="one per prompt"):
        mixed.generate_ids_batch(prompts, choices[:2])


def test_a_row_that_cannot_fit_is_refused_and_the_batch_goes_on(tiny_package):
    model = lora_edge.load(tiny_package, threads=1)
    batch = model.batch(2, capacity=16)
    batch.add(Row([5, 6, 7], "qv_r4", 4, eos_ids=frozenset()))
    with pytest.raises(lora_edge.RuntimeInputError, match="context of 16 tokens"):
        batch.add(Row(list(range(3, 13)), None, 8))
    batch.add(Row([8, 9], None, 2, eos_ids=frozenset()))
    with pytest.raises(lora_edge.RuntimeInputError, match="full"):
        batch.add(Row([8], None, 2))
    while batch.rows:
        batch.step()


@pytest.mark.real
def test_real_mixed_batch_is_each_request_alone(tmp_path_factory):
    """SmolLM2 at float32 with the trained adapters: base, pirate, shout and a blend in one batch, joining at different
    steps: each row's logits and greedy answer are the request's alone."""
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec, ExportConfig

    out = tmp_path_factory.mktemp("real-batch") / "pkg"
    export(ExportConfig(base=real_gguf(), output=out, adapters=tuple(AdapterSpec(n, p) for n, p in REAL_ADAPTERS.items())))
    model = lora_edge.load(out, threads=2)
    questions = ["What is snow?", "Name a big city.", "Why is the sea salty?", "What is snow?"]
    prompts = [model.tokenizer.encode(q, chat=True) for q in questions]
    choices = ["pirate", None, "shout", {"pirate": 0.5, "shout": 0.5}]
    rows, seen, peak = staggered(model, prompts, choices, [12, 9, 12, 7], [0, 0, 2, 3])
    assert peak == 4
    assert_rows_alone(model, rows, seen, choices)
