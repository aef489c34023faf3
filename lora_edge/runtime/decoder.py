"""A decoder package on the device: one graph call (``forward``), step functions over an in-place KV cache, and
one greedy generation loop, in which a single prompt is a batch of one. No torch, no transformers."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import RuntimeInputError
from ..package.manifest import ALORA_MASK
from .adapter_set import AdapterChoice
from .session import PackageModel

Step = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "length"


class Rows(Protocol):
    """The graph calls of a decoding loop over rows of different lengths."""

    def prefill(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """``ids`` (batch, width) right-padded, ``lens`` (batch,) -> each row's last logits (batch, vocab)."""

    def next(self, tokens: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """``tokens`` (batch, 1) placed after each row's ``lens`` tokens -> their logits (batch, vocab)."""


class DecoderModel(PackageModel):
    """A loaded decoder package: ``generate``/``stream`` text, ``generate_ids`` token ids, ``forward`` logits."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        inputs = {i.name for i in self.session.get_inputs()}
        self._past_names = [n for i in range(self.num_layers) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
                            if n in inputs]  # layer order, key then value: the order of ``past`` lists  # fmt: skip
        self._empty_past = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.dtype), self.device, 0)

    def _reset(self, io: ort.IOBinding) -> None:
        """A pooled binding keeps no cache alive: the KV cache inputs point at an empty tensor. Every call rebinds
        all its inputs, so nothing stale is ever read."""
        super()._reset(io)
        for name in self._past_names:
            io.bind_ortvalue_input(name, self._empty_past)

    def _default_eos(self) -> frozenset[int]:
        return self.tokenizer.eos_ids if (self.root / "tokenizer.json").is_file() else frozenset()

    def empty_past(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.dtype)
        return [z] * (2 * self.num_layers)

    # -- one graph call -------------------------------------------------------------------
    def forward(self, input_ids, adapter: AdapterChoice = None, attention_mask=None, position_ids=None,
                past: list[np.ndarray] | None = None, return_past: bool = False, *, scale: float = 1.0):  # fmt: skip
        """Logits (batch, seq, vocab) for ``input_ids`` (batch, seq); optionally the new KV cache. ``adapter``: a name,
        a blend ``{name: weight}``, or None for the base; ``scale``: its strength."""
        adapter = self._adapters.key(adapter, scale)
        ids = self._as_ids(input_ids)
        tokens = self._adapters.invocation(adapter)
        activation = activation_mask(ids, tokens)[0] if tokens else None
        return self._forward(ids, adapter, attention_mask, position_ids, past, return_past, activation)

    def _forward(self, ids: np.ndarray, adapter, attention_mask, position_ids, past, return_past: bool, activation):
        """``activation``: activated LoRA's (batch, seq) mask for this call, or None (the adapter applies everywhere)."""
        b, s = ids.shape
        past = past if past is not None else self.empty_past(b)
        p = past[0].shape[2]
        if p + s > self.max_length:
            raise RuntimeInputError(f"{p + s} tokens exceed the model's context of {self.max_length}; shorten the prompt or max_new_tokens")
        mask = np.ones((b, p + s), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if self.fused_attention and attention_mask is not None and not mask.all():
            raise RuntimeInputError(
                "this package's fused attention (GroupQueryAttention) takes unpadded sequences; run prompts of different "
                "lengths one by one, or export with --attention reference for padded batches"
            )
        if position_ids is None:
            position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -s:]
        with self.bound(adapter) as io:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
            for name, value in zip(self._past_names, past):  # as OrtValues: the reset then drops them
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, self.dtype)))
            mask = bind_mask(io, activation, self.dtype) if activation is not None else None
            outs = self._run(io)
            del mask  # (the binding borrowed it until the run)
        return (outs[0], outs[1:]) if return_past else outs[0]

    # -- step functions -------------------------------------------------------------------
    def steps(self, adapter: AdapterChoice, capacity: int, batch: int = 1) -> Step:
        """A decoding loop's step function: ``step(ids (batch, s), total) -> last logits (batch, vocab)``,
        where ``total`` counts the tokens so far including ``ids`` (rows of equal length, no padding)."""
        if not self.fused_attention:
            return self._plain_steps(adapter, batch)
        rows = _FusedRows(self, self.binding(adapter), batch, capacity)

        def step(ids: np.ndarray, total: int) -> np.ndarray:
            positions = np.repeat(rows.columns[None, total - ids.shape[1] : total], batch, axis=0)
            return rows.call(ids, positions, np.full(batch, total, np.int64))[:, -1]

        return step

    def _plain_steps(self, adapter: AdapterChoice, batch: int = 1) -> Step:
        """Reference graphs: the KV cache comes back as new arrays each step. An activated adapter's mask comes from
        the first call's tokens (the prompt); every later token is adapted where the prompt invoked it."""
        adapter = self._adapters.key(adapter)
        tokens = self._adapters.invocation(adapter)
        state = {"past": self.empty_past(batch), "found": None}

        def step(ids: np.ndarray, total: int) -> np.ndarray:
            positions = np.repeat(np.arange(total - ids.shape[1], total, dtype=np.int64)[None], batch, axis=0)
            activation = None
            if tokens and state["found"] is None:
                activation, state["found"] = activation_mask(ids, tokens)
            elif tokens:
                activation = np.repeat(state["found"][:, None], ids.shape[1], axis=1).astype(np.float32)
            logits, state["past"] = self._forward(ids, adapter, np.ones((batch, total), np.int64), positions, state["past"],
                                                  True, activation)  # fmt: skip
            return logits[:, -1]

        return step

    # -- generation -----------------------------------------------------------------------
    def generate_ids(self, prompt_ids: Sequence[int], adapter: AdapterChoice = None, max_new_tokens: int = 64,
                     min_new_tokens: int = 0, on_token: Callable[[int], None] | None = None,
                     eos_ids: frozenset[int] | None = None, *, scale: float = 1.0) -> tuple[list[int], str]:  # fmt: skip
        """Greedy decoding from token ids: prefill in one call, then one call per new token. Returns (tokens,
        "eos" | "length")."""
        each = None if on_token is None else (lambda row, t: on_token(t))
        adapter = self._adapters.key(adapter, scale)
        return self._generate([prompt_ids], adapter, max_new_tokens, min_new_tokens, eos_ids, each)[0]

    def generate_ids_batch(self, prompts: Sequence[Sequence[int]], adapter: AdapterChoice = None, max_new_tokens: int = 64,
                           min_new_tokens: int = 0, eos_ids: frozenset[int] | None = None, *,
                           scale: float = 1.0) -> list[tuple[list[int], str]]:  # fmt: skip
        """Greedy decoding of several prompts of any lengths. On fused graphs they are one batch: right-padded and
        prefilled in one call, then each step feeds every row its next token; the attention mask carries each
        row's length (GroupQueryAttention reads it as seqlens), so every row attends to its own tokens only and
        writes its keys/values at its own position of the shared cache. Each row gives exactly what
        :meth:`generate_ids` gives for it alone."""
        return self._generate(prompts, self._adapters.key(adapter, scale), max_new_tokens, min_new_tokens, eos_ids, None)

    def _generate(self, prompts, adapter, max_new_tokens: int, min_new_tokens: int, eos_ids, on_token) -> list[tuple[list[int], str]]:
        prompts = self._check_prompts(prompts, max_new_tokens, min_new_tokens)
        eos_ids = self._default_eos() if eos_ids is None else frozenset(eos_ids)
        if max_new_tokens == 0:
            return [([], "length") for _ in prompts]
        if self.fused_attention:
            with self.bound(adapter) as io:
                capacity = max(len(p) for p in prompts) + max_new_tokens
                rows = _FusedRows(self, io, len(prompts), capacity, self._adapters.invocation(adapter))
                return greedy(rows, prompts, max_new_tokens, min_new_tokens, eos_ids, on_token)
        # reference graphs: one row at a time (their cache grows by copies; batching buys nothing there)
        return [greedy(_PlainRows(self._plain_steps(adapter)), [p], max_new_tokens, min_new_tokens, eos_ids,
                       None if on_token is None else (lambda _, t, i=i: on_token(i, t)))[0]
                for i, p in enumerate(prompts)]  # fmt: skip

    def _check_prompts(self, prompts, max_new_tokens: int, min_new_tokens: int) -> list[list[int]]:
        if max_new_tokens < 0 or min_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens and min_new_tokens must be >= 0")
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise RuntimeInputError("the prompt is empty" if len(prompts) <= 1 else "every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_length:
            what = "prompt" if len(prompts) == 1 else "the longest prompt"
            raise RuntimeInputError(f"{what} ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's context of "
                                    f"{self.max_length} tokens; shorten the prompt or lower max_new_tokens")  # fmt: skip
        if min(min(p) for p in prompts) < 0 or max(max(p) for p in prompts) >= self.vocab_size:
            raise RuntimeInputError(f"token ids must lie in [0, {self.vocab_size})")
        return prompts

    def stream(self, prompt: str, adapter: AdapterChoice = None, max_new_tokens: int = 64, chat: bool = True, **kw) -> Iterator[str]:
        """Yield text pieces as they are generated (runs the loop in a worker thread)."""
        import queue

        q: queue.Queue = queue.Queue()
        tok = self.tokenizer
        ids = tok.encode(prompt, chat)
        generated: list[int] = []
        state = {"text": ""}

        def on_token(t: int) -> None:
            generated.append(t)
            text = tok.decode(generated)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                q.put(text[len(state["text"]) :])
                state["text"] = text

        def work() -> None:
            try:
                self.generate_ids(ids, adapter, max_new_tokens, on_token=on_token, **kw)
                q.put(None)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)

        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item

    def generate(
        self,
        prompt: str | Sequence[str],
        adapter: AdapterChoice = None,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        chat: bool = True,
        return_result: bool = False,
        *,
        scale: float = 1.0,
    ):
        """Greedy completion of ``prompt``; the chat template is applied when the package has one and ``chat``.

        A list of prompts gives a list of answers, decoded together as one batch on the fused graph
        (:meth:`generate_ids_batch`), one after another on a reference graph."""
        tok = self.tokenizer
        adapter = self._adapters.key(adapter, scale)
        if not isinstance(prompt, str):
            prompts = [tok.encode(p, chat) for p in prompt]
            results = self.generate_ids_batch(prompts, adapter, max_new_tokens, min_new_tokens)
            return [GenerationResult(tok.decode(out), out, len(ids), reason) if return_result else tok.decode(out)
                    for ids, (out, reason) in zip(prompts, results)]  # fmt: skip
        ids = tok.encode(prompt, chat)
        out, reason = self.generate_ids(ids, adapter, max_new_tokens, min_new_tokens)
        text = tok.decode(out)
        if return_result:
            return GenerationResult(text=text, token_ids=out, prompt_tokens=len(ids), finish_reason=reason)
        return text


def greedy(rows: Rows, prompts: list[list[int]], max_new_tokens: int, min_new_tokens: int, eos_ids: frozenset[int],
           on_token: Callable[[int, int], None] | None) -> list[tuple[list[int], str]]:  # fmt: skip
    """The generation loop: argmax per row until its eos or ``max_new_tokens``; eos is masked out for the first
    ``min_new_tokens``. Rows that finished keep computing until all have (their outputs are not used)."""
    lens = np.array([len(p) for p in prompts], np.int64)
    ids = np.zeros((len(prompts), int(lens.max())), np.int64)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    last = rows.prefill(ids, lens)
    outs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    active = np.ones(len(prompts), bool)
    eos = sorted(eos_ids)
    for produced in range(max_new_tokens):
        if produced < min_new_tokens and eos:
            last = last.copy()
            last[:, eos] = -np.inf
        nxt = np.argmax(last, axis=-1)
        for r in np.flatnonzero(active):
            token = int(nxt[r])
            if token in eos_ids:
                active[r], reasons[r] = False, "eos"
                continue
            outs[r].append(token)
            if on_token is not None:
                on_token(int(r), token)
            if len(outs[r]) >= max_new_tokens:
                active[r] = False
        if not active.any():
            break
        last = rows.next(nxt[:, None].astype(np.int64), lens)
        lens = lens + 1
    return list(zip(outs, reasons))


class _FusedRows:
    """Fused graphs: a KV cache preallocated for ``capacity`` tokens, bound as both past and present of every
    layer, so GroupQueryAttention writes each step's keys and values in place; nothing is copied per token."""

    def __init__(self, model: DecoderModel, io: ort.IOBinding, batch: int, capacity: int,
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
        io = self.io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", (self.columns[None, : int(total.max())] < total[:, None]).astype(np.int64))
        io.bind_cpu_input("position_ids", positions)
        io.bind_output("logits")
        self.model.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def prefill(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        b, width = ids.shape
        if self.invocation:
            mask = np.zeros((b, width), np.float32)
            for r in range(b):  # each row's own tokens, not its padding
                row, self.found[r:r + 1] = activation_mask(ids[r : r + 1, : lens[r]], self.invocation)
                mask[r, : lens[r]] = row[0]
            self.mask = bind_mask(self.io, mask, self.model.dtype)
        logits = self.call(ids, np.repeat(self.columns[None, :width], b, axis=0), lens)
        return logits[np.arange(b), lens - 1]  # each row's last real token

    def next(self, tokens: np.ndarray, lens: np.ndarray) -> np.ndarray:
        if self.invocation:
            self.mask = bind_mask(self.io, self.found[:, None], self.model.dtype)
        return self.call(tokens, lens[:, None].copy(), lens + 1)[:, -1]


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


class _PlainRows:
    """Reference graphs, one row: the step function's cache grows by copies."""

    def __init__(self, step: Step) -> None:
        self.step = step

    def prefill(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        return self.step(ids, int(lens[0]))

    def next(self, tokens: np.ndarray, lens: np.ndarray) -> np.ndarray:
        return self.step(tokens, int(lens[0]) + 1)
