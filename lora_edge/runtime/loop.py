"""The generation loop and the graph calls it makes: one loop for every prompt, a single one being a batch of one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import onnxruntime as ort

from ..package.manifest import ALORA_MASK, LOGITS_TO_KEEP
from .sampling import GREEDY, Sampling

if TYPE_CHECKING:
    from .decoder import DecoderModel, Step

StopCheck = Callable[[int, list[int]], bool]  # (row, its tokens so far) -> whether a stop string has appeared
Call = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (ids, positions, total) -> last logits

# A long prompt is prefilled in calls of at most this many tokens: a call's activations grow with its tokens, and
# ONNX Runtime's arena keeps what the largest call took for the session's life. On SmolLM2 int4 a 512-token prompt
# peaked 20-34 MiB lower in chunks of 128, and prefilled faster (attention's per-call cost grows with its square).
PREFILL_CHUNK = 128


class Rows(Protocol):
    """The graph calls of a decoding loop over rows of different lengths."""

    def prefill(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """``ids`` (batch, width) right-padded, ``lens`` (batch,) -> each row's last logits (batch, vocab)."""

    def next(self, tokens: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """``tokens`` (batch, 1) placed after each row's ``lens`` tokens -> their logits (batch, vocab)."""


def decode_loop(rows: Rows, prompts: list[list[int]], max_new_tokens: int, min_new_tokens: int, eos_ids: frozenset[int],
                on_token: Callable[[int, int], None] | None, sampling: Sampling = GREEDY,
                stop: StopCheck | None = None, first_row: int = 0) -> list[tuple[list[int], str]]:  # fmt: skip
    """The generation loop: a token per row (``sampling``: argmax by default) until its eos, a stop string
    (``stop``) or ``max_new_tokens``; eos is masked out for the first ``min_new_tokens``. Rows that finished keep
    computing until all have (their outputs are not used). Returns (tokens, "eos" | "stop" | "length") per row."""
    lens = np.array([len(p) for p in prompts], np.int64)
    ids = np.zeros((len(prompts), int(lens.max())), np.int64)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    last = rows.prefill(ids, lens)
    outs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    active = np.ones(len(prompts), bool)
    eos = sorted(eos_ids)
    generators = sampling.generators(len(prompts), first_row)  # row r samples alike alone and in a batch
    for produced in range(max_new_tokens):
        if produced < min_new_tokens and eos:
            last = last.copy()
            last[:, eos] = -np.inf
        if sampling.greedy:
            nxt = np.argmax(last, axis=-1)
        else:
            nxt = sampling.choose(sampling.process(last, [p + o for p, o in zip(prompts, outs)]), generators)
        for r in np.flatnonzero(active):
            token = int(nxt[r])
            if token in eos_ids:
                active[r], reasons[r] = False, "eos"
                continue
            outs[r].append(token)
            if on_token is not None:
                on_token(int(r), token)
            if stop is not None and stop(int(r), outs[r]):
                active[r], reasons[r] = False, "stop"
            elif len(outs[r]) >= max_new_tokens:
                active[r] = False
        if not active.any():
            break
        last = rows.next(nxt[:, None].astype(np.int64), lens)
        lens = lens + 1
    return list(zip(outs, reasons))


class FusedRows:
    """Fused graphs: a KV cache preallocated for ``capacity`` tokens, bound as both past and present of every
    layer, so GroupQueryAttention writes each step's keys and values in place; nothing is copied per token."""

    def __init__(self, model: "DecoderModel", io: ort.IOBinding, batch: int, capacity: int,
                 invocation: tuple[int, ...] | None = None) -> None:  # fmt: skip
        self.model, self.io, self.invocation = model, io, invocation
        self.found = np.zeros(batch, bool)  # activated LoRA: the rows whose prompt holds the invocation tokens
        self.mask: ort.OrtValue | None = None  # the bound activation mask, alive while bound
        self.columns = np.arange(capacity, dtype=np.int64)
        io.bind_output("logits")
        shape = (batch, model.num_kv_heads, capacity, model.head_dim)
        for name in model._past_names:
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, model.dtype), model.device, 0)
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)

    def call(self, ids: np.ndarray, positions: np.ndarray, total: np.ndarray) -> np.ndarray:
        return fused_call(self.model, self.io, ids, positions, total, self.columns)

    def prefill(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        bind = self._mask_binder(ids, lens) if self.invocation else None
        return prefill(self.call, ids, 0, lens, self.columns, self.model.device, bind)

    def _mask_binder(self, ids: np.ndarray, lens: np.ndarray) -> Callable[[int, int], None]:
        """Activated LoRA: the prompt's mask, found over all of it, bound a prefill call's columns at a time."""
        b, width = ids.shape
        mask = np.zeros((b, width), np.float32)
        for r in range(b):  # each row's own tokens, not its padding
            row, self.found[r:r + 1] = activation_mask(ids[r : r + 1, : lens[r]], self.invocation)
            mask[r, : lens[r]] = row[0]

        def bind(start: int, end: int) -> None:
            self.mask = bind_mask(self.io, mask[:, start:end], self.model.dtype)

        return bind

    def next(self, tokens: np.ndarray, lens: np.ndarray) -> np.ndarray:
        if self.invocation:
            self.mask = bind_mask(self.io, self.found[:, None], self.model.dtype)
        return self.call(tokens, lens[:, None].copy(), lens + 1)


def prefill(call: Call, ids: np.ndarray, first: int, total: np.ndarray, columns: np.ndarray, device: str,
            bind: Callable[[int, int], None] | None = None) -> np.ndarray:  # fmt: skip
    """Prefill ``ids`` (B, S), placed at columns [first, first + S) of rows holding ``total[b]`` tokens after it, in
    calls of at most PREFILL_CHUNK tokens -> the logits of each row's last token. ``bind(start, end)``, before
    each call, binds the inputs that go with those columns (an activated adapter's mask). In chunks only where
    every row holds all S tokens (rows of one length): GroupQueryAttention takes a call's tokens to end at each
    row's total, so a chunk past a shorter row's end would place the longer rows' keys wrongly. And only on the
    CPU, where it is tested; on CUDA a prompt stays one call."""
    b, width = ids.shape
    size = PREFILL_CHUNK if device == "cpu" and (total == first + width).all() else width
    for start in range(0, width, size):
        end = min(width, start + size)
        if bind is not None:
            bind(start, end)
        positions = np.repeat(columns[None, first + start : first + end], b, axis=0)
        logits = call(ids[:, start:end], positions, np.minimum(total, first + end))
    return logits


def fused_call(model: "DecoderModel", io: ort.IOBinding, ids: np.ndarray, positions: np.ndarray, total: np.ndarray,
               columns: np.ndarray) -> np.ndarray:  # fmt: skip
    """One call of a fused graph whose cache is bound (after "logits", its first output): ``ids`` (B, S) at
    ``positions`` (B, S), row b holding ``total[b]`` tokens after it (its own tokens first, then padding) -> the
    logits of each row's last token (B, vocab); the graph computes no more positions than that needs."""
    last = total - 1 - positions[:, 0]  # where each row's last token is in this call
    io.bind_cpu_input("input_ids", ids)
    io.bind_cpu_input("attention_mask", (columns[None, : int(total.max())] < total[:, None]).astype(np.int64))
    io.bind_cpu_input("position_ids", positions)
    keep = bind_keep(model, io, ids.shape[1] - int(last.min()))
    io.bind_output("logits")
    model.run_bound(io)
    del keep  # (the binding borrowed it until the run)
    logits = io.get_outputs()[0].numpy()
    return logits[np.arange(len(ids)), last - (ids.shape[1] - logits.shape[1])]


def bind_keep(model: "DecoderModel", io: ort.IOBinding, last: int) -> ort.OrtValue | None:
    """Ask the graph for the logits of the ``last`` positions only (0: all), where it can; the caller keeps the
    returned value alive until the run. Bound on every call: a binding keeps what an earlier call bound."""
    if model.manifest.graph.logits_to_keep is None:
        return None
    value = ort.OrtValue.ortvalue_from_numpy(np.array([last], np.int64))
    io.bind_ortvalue_input(LOGITS_TO_KEEP, value)
    return value


def bind_mask(io: ort.IOBinding, mask: np.ndarray, dtype) -> ort.OrtValue:
    """Bind an activation mask (batch, seq) as the graph's (batch, seq, 1) input; the caller keeps the returned value
    alive until the run (the binding borrows its memory). An overridable initializer binds as an OrtValue: ONNX Runtime
    looks a numpy input up among the graph's plain inputs only."""
    value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mask[..., None], dtype))
    io.bind_ortvalue_input(ALORA_MASK, value)
    return value


def activation_mask(ids: np.ndarray, invocation: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Activated LoRA's mask for ``ids`` (batch, seq), as PEFT computes it: 1 from the start of the last occurrence of
    the invocation tokens in each row on, 0 before (and everywhere in a row without them); and which rows have them."""
    b, s = ids.shape
    n = len(invocation)
    mask, found = np.zeros((b, s), np.float32), np.zeros(b, bool)
    if s < n:
        return mask, found
    windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # (b, s - n + 1, n)
    hits = (windows == np.asarray(invocation, ids.dtype)).all(axis=2)
    for r in range(b):
        starts = np.flatnonzero(hits[r])
        if starts.size:
            mask[r, starts[-1] :], found[r] = 1.0, True
    return mask, found


class PlainRows:
    """Reference graphs, one row: the step function's cache grows by copies."""

    def __init__(self, step: "Step") -> None:
        self.step = step

    def prefill(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        return self.step(ids, int(lens[0]))

    def next(self, tokens: np.ndarray, lens: np.ndarray) -> np.ndarray:
        return self.step(tokens, int(lens[0]) + 1)
