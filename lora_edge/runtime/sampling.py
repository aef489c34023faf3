"""Choosing the next token: greedy by default, or sampled with the semantics of transformers' ``generate`` (the same
logits processors in the same order: repetition penalty, then temperature, top-k, top-p, min-p), in numpy.

A seed makes a generation repeatable: each row draws from its own generator, seeded from the seed and its index."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import RuntimeInputError


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False  # False: argmax (the processors still apply, as transformers applies them)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature, lambda v: v > 0, "> 0"),
            ("top_k", self.top_k, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
            ("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0"),
        ]
        for name, value, ok, want in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise RuntimeInputError(f"{name} must be {want}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise RuntimeInputError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Plain argmax: the loop takes its fast path."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def generators(self, rows: int, first: int = 0) -> list[np.random.Generator]:
        """One generator per row of a batch, rows ``first`` .. ``first + rows - 1``."""
        seeds = [None] * rows if self.seed is None else [(self.seed, first + r) for r in range(rows)]
        return [np.random.default_rng(s if s is None else list(s)) for s in seeds]

    def process(self, scores: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """``scores`` (rows, vocab) float32 after the processors; ``history``: each row's tokens so far, prompt included."""
        scores = np.array(scores, np.float32)
        if self.repetition_penalty != 1.0:
            for r, ids in enumerate(history):
                seen = np.unique(np.asarray(ids, np.int64))
                s = scores[r, seen]
                scores[r, seen] = np.where(s < 0, s * self.repetition_penalty, s / self.repetition_penalty)
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / np.float32(self.temperature)
        if self.top_k:
            k = min(self.top_k, scores.shape[-1])
            kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if self.top_p < 1.0:
            order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
            ascending = np.take_along_axis(scores, order, axis=-1)
            cumulative = np.cumsum(_softmax(ascending), axis=-1)
            remove = cumulative <= 1 - self.top_p
            remove[:, -1:] = False  # keep at least one
            scores = np.where(_unsort(remove, order), -np.inf, scores)
        if self.min_p > 0.0:
            probs = _softmax(scores)
            remove = probs < self.min_p * probs.max(axis=-1, keepdims=True)
            remove[np.arange(len(scores)), probs.argmax(axis=-1)] = False
            scores = np.where(remove, -np.inf, scores)
        return scores

    def choose(self, scores: np.ndarray, generators: list[np.random.Generator]) -> np.ndarray:
        """One token per row: the argmax, or a draw from softmax(scores)."""
        if not self.do_sample:
            return np.argmax(scores, axis=-1)
        probs = _softmax(scores.astype(np.float64))
        return np.array([g.choice(len(p), p=p / p.sum()) for g, p in zip(generators, probs)], np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out


GREEDY = Sampling()
