"""Continuous batching: rows, each with its own prompt, adapter and sampling, decode together, one graph call per step.
Rows join between steps (the joining rows' prompts prefilled in one call into their part of the cache) and leave
when they are done, so a request never waits for another to finish.

The KV cache is one array per layer and kind, (rows, kv heads, length, head size), bound as both past and present
(GroupQueryAttention writes each row's new keys and values in place, at that row's own length, read from the
attention mask). The rows in use are always the first ``n``: a step binds views of ``[:n]``, a prefill of ``[n:n + k]``,
and a leaving row's place is taken by the last row (its cache copied up to its length). The length grows by doubling
as the rows need it, up to the capacity: ONNX Runtime touches a row's whole slice, so a cache sized for the capacity
would hold that much memory from the first token.

Rows with different adapters share a call through the package's row mask: the adapters are stacked along the rank
(adapters.blend.stack) and each row keeps its own adapter's columns (AdapterSet.bank)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import RuntimeInputError
from ..package.manifest import ROW_MASK, ROW_MASK_CHUNKS
from .adapter_set import AdapterSet, label
from .loop import fused_call, prefill
from .sampling import GREEDY, Sampling

FIRST_LENGTH = 256  # cache positions per row to start with

if TYPE_CHECKING:
    from .decoder import DecoderModel


def banked(keys: Sequence[Hashable]) -> tuple[Hashable, ...]:
    """The choices a bank for rows of ``keys`` stacks: each once, the base none (its rows keep no column), in an order
    that does not depend on the rows' (one cached bank per set)."""
    return tuple(sorted({k for k in keys if k is not None}, key=label))


def batches(model: "DecoderModel") -> bool:
    """Whether ``model`` can decode requests in a :class:`Batch`: fused attention, on the CPU (the cache is numpy)."""
    return model.fused_attention and model.device == "cpu"


def shareable(adapters: AdapterSet, keys: Sequence[Hashable]) -> bool:
    """Whether rows of ``keys`` can share calls: one choice, or choices the package's row mask can mix (standard-op
    branches; not an activated adapter, DoRA, a replaced module or a trained bias)."""
    if len(set(keys)) <= 1:
        return True
    try:
        adapters.bank(banked(keys))
    except RuntimeInputError:
        return False
    return True


@dataclass(eq=False)
class Row:
    """One request in a batch. ``key``: an AdapterSet key (a name, a blend, or None for the base). ``stop(tokens)`` is
    asked after every new token (a stop string, a client gone) and ends the row with "stop"."""

    prompt: list[int]
    key: Hashable = None
    max_new_tokens: int = 64
    sampling: Sampling = GREEDY
    eos_ids: frozenset[int] = frozenset()
    min_new_tokens: int = 0
    stop: Callable[[list[int]], bool] | None = None
    on_logits: Callable[[np.ndarray], None] | None = None  # each distribution the row's next token is chosen from
    seed_row: int = 0  # a seeded row samples as this row of a call of its own (Sampling.generators)
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None  # "eos" | "stop" | "length" once done
    length: int = 0  # tokens in the cache
    pending: int = -1  # the token the next step feeds
    _generator: np.random.Generator | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def take(self, logits: np.ndarray) -> None:
        """Choose the next token from ``logits`` (vocab,), as decode_loop does for a row alone."""
        if self.on_logits is not None:
            self.on_logits(logits)
        if len(self.tokens) < self.min_new_tokens and self.eos_ids:
            logits = logits.copy()
            logits[sorted(self.eos_ids)] = -np.inf
        if self.sampling.greedy:
            token = int(np.argmax(logits))
        else:
            if self._generator is None:
                self._generator = self.sampling.generators(1, self.seed_row)[0]
            scores = self.sampling.process(logits[None], [self.prompt + self.tokens])
            token = int(self.sampling.choose(scores, [self._generator])[0])
        if token in self.eos_ids:
            self.reason = "eos"
            return
        self.tokens.append(token)
        self.pending = token
        if self.stop is not None and self.stop(self.tokens):
            self.reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.reason = "length"


class Batch:
    """Up to ``rows`` rows of at most ``capacity`` tokens each (prompt and answer), decoding together on a package with
    fused attention, on the CPU."""

    def __init__(self, model: "DecoderModel", rows: int, capacity: int | None = None) -> None:
        if not batches(model):
            raise RuntimeInputError("batches of requests run on a package with fused attention on the CPU; "
                                    "this one decodes one request at a time")  # fmt: skip
        self.model, self.size = model, rows
        self.capacity = min(capacity or model.max_length, model.max_length)
        self._columns = np.arange(self.capacity, dtype=np.int64)
        self._chunked = any(s.lora_B_chunks for s in model.manifest.slots)
        self.rows: list[Row] = []
        self._cache: list[np.ndarray] = []
        self._grow(min(self.capacity, FIRST_LENGTH))
        self._io: ort.IOBinding | None = None  # the step's binding, remade when the rows change
        self._keep: list[ort.OrtValue] = []  # what that binding borrows

    # -- who may join -----------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.size - len(self.rows)

    def accepts(self, key: Hashable) -> bool:
        """Whether a row of ``key`` can share calls with the rows here: the same choice, or choices the package's row
        mask can mix (standard-op branches; not an activated adapter, DoRA or a replaced module)."""
        return shareable(self.model._adapters, [r.key for r in self.rows] + [key])

    # -- joining and stepping ---------------------------------------------------------------
    def check(self, row: Row) -> None:
        """Refuse, in one line, a row that cannot fit a place of this batch."""
        if not row.prompt or len(row.prompt) + row.max_new_tokens > self.capacity:
            raise RuntimeInputError(f"the prompt ({len(row.prompt)} tokens) + max_new_tokens ({row.max_new_tokens}) exceed "
                                    f"the batch's context of {self.capacity} tokens per request")  # fmt: skip

    def add(self, *rows: Row) -> None:
        """Prefill ``rows`` in one call into the next free places and choose their first tokens; they take part in the
        following steps unless that token already ended them. Rows of different choices must be shareable."""
        if len(rows) > self.free:
            raise RuntimeInputError(f"the batch is full ({self.size} rows, {self.free} free)")
        for row in rows:
            self.check(row)
            if row.max_new_tokens == 0:
                row.reason = "length"
        joining = [row for row in rows if not row.done]
        if not joining:
            return
        start, k = len(self.rows), len(joining)
        lens = np.array([len(r.prompt) for r in joining], np.int64)
        self._fit(int(lens.max()))
        ids = np.zeros((k, int(lens.max())), np.int64)  # right-padded: each row's length travels in the attention mask
        for j, row in enumerate(joining):
            ids[j, : lens[j]] = row.prompt
        io, keep = self._bind([r.key for r in joining], start, start + k)
        logits = prefill(lambda *call: self._call(io, *call), ids, 0, lens, self._columns, self.model.device)
        del keep
        self.rows.extend(joining)
        self._io = None
        for j, row in enumerate(joining):
            row.length = int(lens[j])
            row.take(logits[j])
        self._leave([row for row in joining if row.done])

    def step(self) -> list[Row]:
        """One token for every row; returns the rows that finished (they have left)."""
        if not self.rows:
            return []
        self._fit(max(r.length for r in self.rows) + 1)
        if self._io is None:
            self._io, self._keep = self._bind([r.key for r in self.rows], 0, len(self.rows))
        lens = np.array([r.length for r in self.rows], np.int64)
        ids = np.array([[r.pending] for r in self.rows], np.int64)
        logits = self._call(self._io, ids, lens[:, None].copy(), lens + 1)
        for r, row in enumerate(self.rows):
            row.length += 1
            row.take(logits[r])
        return self._leave([row for row in self.rows if row.done])

    def cancel(self, row: Row) -> None:
        """Take ``row`` out now (its client is gone), reason "stop"."""
        row.reason = row.reason or "stop"
        self._leave([row])

    # -- internals ------------------------------------------------------------------------------
    def _fit(self, length: int) -> None:
        """A cache of at least ``length`` positions per row (doubling: a long answer regrows it a few times)."""
        if length > self._cache[0].shape[2]:
            self._grow(min(self.capacity, max(length, 2 * self._cache[0].shape[2])))

    def _grow(self, length: int) -> None:
        """The cache at ``length`` positions per row, the rows' keys and values copied over. ONNX Runtime writes
        through a row's whole slice of the buffer, so the length in use, not the capacity, decides the memory."""
        m = self.model
        shape = (self.size, m.num_kv_heads, length, m.head_dim)
        old, self._cache = self._cache, [np.zeros(shape, m.dtype) for _ in m._past_names]
        used = max((r.length for r in self.rows), default=0)
        for new, c in zip(self._cache, old):
            new[: len(self.rows), :, :used] = c[: len(self.rows), :, :used]
        self._io = None  # bound to the old arrays

    def _leave(self, done: list[Row]) -> list[Row]:
        for row in done:
            if row not in self.rows:
                continue
            i, last = self.rows.index(row), len(self.rows) - 1
            if i != last:  # the last row takes the place: its cache up to its length
                moved = self.rows[last]
                for c in self._cache:
                    c[i, :, : moved.length] = c[last, :, : moved.length]
                self.rows[i] = moved
            self.rows.pop()
            self._io = None
        return done

    def _bind(self, keys: list[Hashable], start: int, end: int) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        """A binding for rows ``keys`` in the cache's places [start, end): one choice's tensors, or the bank of them
        all with each row's mask; the returned values must outlive the call."""
        if len(set(keys)) == 1:
            io = self.model._binding(keys[0])
            return io, self._bind_cache(io, start, end)
        distinct = banked(keys)
        tensors, rank = self.model._adapters.bank(distinct)
        io = self.model.session.io_binding()
        for name, value in tensors.items():
            io.bind_ortvalue_input(name, value)
        mask = np.zeros((len(keys), 1, rank * len(distinct)), self.model.dtype)  # (B, 1, R): each row's own columns
        for r, k in enumerate(keys):
            if k is not None:
                j = distinct.index(k)
                mask[r, :, j * rank : (j + 1) * rank] = 1
        keep = [ort.OrtValue.ortvalue_from_numpy(mask)]
        io.bind_ortvalue_input(ROW_MASK, keep[0])
        if self._chunked:
            keep.append(ort.OrtValue.ortvalue_from_numpy(mask.reshape(len(keys), 1, 1, 1, -1)))
            io.bind_ortvalue_input(ROW_MASK_CHUNKS, keep[1])
        return io, keep + self._bind_cache(io, start, end)

    def _bind_cache(self, io: ort.IOBinding, start: int, end: int) -> list[ort.OrtValue]:
        """Bind rows [start, end) of the cache as past and present; the returned values must outlive the call."""
        io.bind_output("logits")  # first: fused_call reads the first output
        values = []
        for name, c in zip(self.model._past_names, self._cache):
            value = ort.OrtValue.ortvalue_from_numpy(c[start:end])  # a view: the call writes into the batch's cache
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
            values.append(value)
        return values

    def _call(self, io: ort.IOBinding, ids: np.ndarray, positions: np.ndarray, total: np.ndarray) -> np.ndarray:
        return fused_call(self.model, io, ids, positions, total, self._columns)

