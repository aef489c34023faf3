"""A decoder package on the device: one graph call (``forward``), step functions over an in-place KV cache, and
one greedy generation loop, in which a single prompt is a batch of one. No torch, no transformers."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import RuntimeInputError
from .adapter_set import AdapterChoice
from .batching import Batch, Row, batches, shareable
from .sampling import GREEDY, Sampling
from .loop import FusedRows, PlainRows, activation_mask, bind_keep, bind_mask, decode_loop, prefill
from .session import PackageModel

Step = Callable[[np.ndarray, int], np.ndarray]


Prompt = str | Sequence[Mapping[str, str]]  # a text, or a conversation of {"role", "content"} messages


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], Mapping)


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string begins in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


class Pieces:
    """The text of a growing token list as pieces safe to send: held back while it could still be the start of a stop
    string, or ends in an incomplete UTF-8 character (what :meth:`DecoderModel.stream` and the server send).

    Each step decodes the last few tokens only, as vLLM's incremental detokenizer does: the tokens since the text was
    last complete, after the tokens that made its last piece (their context: a sentencepiece decoder drops the
    leading space of a text's first token, so a piece decoded alone could lose one). Decoding the whole answer per
    token would cost a long answer time quadratic in its length."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self.decode, self.stops, self.sent = decode, stops, 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""  # the text of tokens[:read]
        self.start = self.read = 0  # tokens[start:read]: the context the next tokens are decoded after

    def step(self, tokens: list[int]) -> tuple[str, bool]:
        """The new piece to send, and whether a stop string has appeared (the text ends before it)."""
        before, after = self.decode(tokens[self.start : self.read]), self.decode(tokens[self.start :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # else: wait for the rest of the character
            self.text += after[len(before) :]
            self.start, self.read = self.read, len(tokens)
        cut = stop_at(self.text, self.stops)
        upto = cut if cut is not None else len(self.text) - self.hold
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece, cut is not None

    def rest(self, tokens: list[int]) -> str:
        """What was held back, once generation ended without a stop string."""
        before, after = self.decode(tokens[self.start : self.read]), self.decode(tokens[self.start :])
        return (self.text + after[len(before) :])[self.sent :]


class Generation:
    """One answer generated in a worker thread, read as text pieces safe to show (:class:`Pieces`). :meth:`close`
    ends it at its next token and waits for the worker (through further KeyboardInterrupts: a Ctrl-C must not
    leave it running beside the next answer). ``produced``: the tokens shown so far; once the end has been read,
    ``reason`` is "eos" | "stop" | "length" ("interrupted" until then)."""

    def __init__(self, run: Callable[[Callable[[list[int]], bool]], tuple[list[int], str]], pieces: Pieces) -> None:
        self._pieces, self._queue, self._gone = pieces, queue.Queue(), threading.Event()
        self.produced, self.reason, self._ended = 0, "interrupted", False
        self._worker = threading.Thread(target=self._work, args=(run,), daemon=True)
        self._worker.start()

    def _check(self, tokens: list[int]) -> bool:  # after every new token: hand on what is safe, end on a stop string
        if self._gone.is_set():
            return True
        self.produced = len(tokens)
        piece, stopped = self._pieces.step(tokens)
        if piece:
            self._queue.put(piece)
        return stopped

    def _work(self, run) -> None:
        try:
            tokens, reason = run(self._check)
            if reason != "stop":  # what was held back
                self._queue.put(self._pieces.rest(tokens))
            self._queue.put(("end", reason))
        except BaseException as exc:  # handed to the reader
            self._queue.put(exc)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._ended:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if isinstance(item, tuple):
                self._ended, self.reason = True, item[1]
            elif item:
                return item
        raise StopIteration

    def close(self) -> None:
        self._gone.set()
        while self._worker.is_alive():
            try:
                self._worker.join()
            except KeyboardInterrupt:
                pass


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"


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

    def _forward(self, ids: np.ndarray, adapter, attention_mask, position_ids, past, return_past: bool, activation,
                 last: int = 0):  # fmt: skip
        """``activation``: activated LoRA's (batch, seq) mask for this call, or None (the adapter applies everywhere);
        ``last``: logits for the last positions only, where the graph can (0: every position)."""
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
            keep = bind_keep(self, io, last)
            outs = self._run(io)
            del mask, keep  # (the binding borrowed them until the run)
        return (outs[0], outs[1:]) if return_past else outs[0]

    # -- step functions -------------------------------------------------------------------
    def steps(self, adapter: AdapterChoice, capacity: int, batch: int = 1) -> Step:
        """A decoding loop's step function: ``step(ids (batch, s), total) -> last logits (batch, vocab)``,
        where ``total`` counts the tokens so far including ``ids`` (rows of equal length, no padding)."""
        if not self.fused_attention:
            return self._plain_steps(adapter, batch)
        rows = FusedRows(self, self.binding(adapter), batch, capacity)

        def step(ids: np.ndarray, total: int) -> np.ndarray:
            return prefill(rows.call, ids, total - ids.shape[1], np.full(batch, total, np.int64), rows.columns, self.device)

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
                                                  True, activation, last=1)  # fmt: skip
            return logits[:, -1]

        return step

    # -- generation -----------------------------------------------------------------------
    def generate_ids(self, prompt_ids: Sequence[int], adapter: AdapterChoice = None, max_new_tokens: int = 64,
                     min_new_tokens: int = 0, on_token: Callable[[int], None] | None = None,
                     eos_ids: frozenset[int] | None = None, *, scale: float = 1.0, sampling: Sampling | None = None,
                     stop: Callable[[list[int]], bool] | None = None) -> tuple[list[int], str]:  # fmt: skip
        """Decoding from token ids: prefill in one call, then one call per new token; greedy unless ``sampling``
        says otherwise; ``stop(tokens)`` ends it early. Returns (tokens, "eos" | "stop" | "length")."""
        each = None if on_token is None else (lambda row, t: on_token(t))
        adapter = self._adapters.key(adapter, scale)
        check = None if stop is None else (lambda row, out: stop(out))
        return self._generate([prompt_ids], adapter, max_new_tokens, min_new_tokens, eos_ids, each, sampling, check)[0]

    def generate_ids_batch(self, prompts: Sequence[Sequence[int]], adapter: AdapterChoice | Sequence[AdapterChoice] = None,
                           max_new_tokens: int = 64, min_new_tokens: int = 0, eos_ids: frozenset[int] | None = None, *,
                           scale: float = 1.0, sampling: Sampling | None = None) -> list[tuple[list[int], str]]:  # fmt: skip
        """Decoding of several prompts of any lengths. On fused graphs they are one batch: right-padded and
        prefilled in one call, then each step feeds every row its next token; the attention mask carries each
        row's length (GroupQueryAttention reads it as seqlens), so every row attends to its own tokens only and
        writes its keys/values at its own position of the shared cache. Each row gives what :meth:`generate_ids`
        gives for it alone. ``adapter`` may be a list, one choice per prompt: rows of different adapters then share
        every call through the package's row mask (runtime.batching), or run one by one where the package has none."""
        if isinstance(adapter, (list, tuple)):
            keys = [self._adapters.key(a, scale) for a in adapter]
            if len(keys) != len(prompts):
                raise RuntimeInputError(f"got {len(keys)} adapters for {len(prompts)} prompts; give one per prompt")
            return self._generate_rows(prompts, keys, max_new_tokens, min_new_tokens, eos_ids, sampling or GREEDY)
        return self._generate(prompts, self._adapters.key(adapter, scale), max_new_tokens, min_new_tokens, eos_ids, None, sampling)

    def batch(self, rows: int = 4, capacity: int | None = None) -> Batch:
        """A continuous batch over this package: up to ``rows`` requests, each with its own adapter and sampling, that
        join and leave between steps (runtime.batching.Batch; what ``lora-edge serve`` runs)."""
        return Batch(self, rows, capacity)

    def _generate_rows(self, prompts, keys: list, max_new_tokens: int, min_new_tokens: int, eos_ids, sampling: Sampling):
        prompts = self._check_prompts(prompts, max_new_tokens, min_new_tokens)
        eos_ids = self._default_eos() if eos_ids is None else frozenset(eos_ids)
        rows = [Row(p, k, max_new_tokens, sampling, eos_ids, min_new_tokens, seed_row=i) for i, (p, k) in enumerate(zip(prompts, keys))]
        if self._batchable(keys):  # one batch: prefilled in one call, then a call per step
            batch = Batch(self, len(rows), max(len(p) for p in prompts) + max_new_tokens)
            batch.add(*rows)
            while batch.rows:
                batch.step()
        else:  # one at a time, as this package runs them
            for i, row in enumerate(rows):
                (row.tokens, row.reason), = self._generate([row.prompt], row.key, max_new_tokens, min_new_tokens, eos_ids, None,
                                                           sampling, first_row=i)  # fmt: skip
        return [(row.tokens, row.reason) for row in rows]

    def _batchable(self, keys: list) -> bool:
        return batches(self) and shareable(self._adapters, keys)

    def _generate(self, prompts, adapter, max_new_tokens: int, min_new_tokens: int, eos_ids, on_token, sampling=None,
                  stop=None, first_row: int = 0) -> list[tuple[list[int], str]]:  # fmt: skip
        sampling = sampling or GREEDY
        prompts = self._check_prompts(prompts, max_new_tokens, min_new_tokens)
        eos_ids = self._default_eos() if eos_ids is None else frozenset(eos_ids)
        if max_new_tokens == 0:
            return [([], "length") for _ in prompts]
        if self.fused_attention:
            with self.bound(adapter) as io:
                capacity = max(len(p) for p in prompts) + max_new_tokens
                rows = FusedRows(self, io, len(prompts), capacity, self._adapters.invocation(adapter))
                return decode_loop(rows, prompts, max_new_tokens, min_new_tokens, eos_ids, on_token, sampling, stop, first_row)
        # reference graphs: one row at a time (their cache grows by copies; batching buys nothing there)
        return [decode_loop(PlainRows(self._plain_steps(adapter)), [p], max_new_tokens, min_new_tokens, eos_ids,
                            None if on_token is None else (lambda _, t, i=i: on_token(i, t)), sampling,
                            None if stop is None else (lambda _, out, i=i: stop(i, out)), first_row=first_row + i)[0]
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

    def stream(self, prompt: Prompt, adapter: AdapterChoice = None, max_new_tokens: int = 64, chat: bool = True, *,
               scale: float = 1.0, stop: Sequence[str] = (), min_new_tokens: int = 0, **sampling) -> Iterator[str]:  # fmt: skip
        """Yield text pieces as they are generated (the loop runs in a worker thread); options as :meth:`generate`.
        Text that could begin a stop string is held back until it is known not to. A reader that stops early (closes
        the iterator, or drops it) ends the generation at its next token."""
        answer = self.generation(self.tokenizer.encode(prompt, chat), adapter, max_new_tokens, min_new_tokens, scale=scale,
                                 sampling=self._sampling(sampling), stop=stop)  # fmt: skip
        try:
            yield from answer
        finally:
            answer.close()

    def generation(self, prompt_ids: Sequence[int], adapter: AdapterChoice = None, max_new_tokens: int = 64,
                   min_new_tokens: int = 0, *, scale: float = 1.0, sampling: Sampling | None = None,
                   stop: Sequence[str] = ()) -> Generation:  # fmt: skip
        """Start generating from token ids in a worker thread: a :class:`Generation` to iterate over in text pieces
        (what :meth:`stream` and ``lora-edge chat`` read)."""
        key = self._adapters.key(adapter, scale)
        tok = self.tokenizer

        def run(check: Callable[[list[int]], bool]) -> tuple[list[int], str]:
            return self._generate([prompt_ids], key, max_new_tokens, min_new_tokens, None, None, sampling,
                                  lambda _row, out: check(out))[0]  # fmt: skip

        return Generation(run, Pieces(tok.decode, tuple(stop)))

    def generate(self, prompt: Prompt | Sequence[Prompt], adapter: AdapterChoice = None, max_new_tokens: int = 64,
                 min_new_tokens: int = 0, chat: bool = True, return_result: bool = False, *, scale: float = 1.0,
                 stop: Sequence[str] = (), **sampling):  # fmt: skip
        """Complete ``prompt``: a string (the chat template applied when the package has one and ``chat``), a
        conversation (a list of {"role", "content"} messages), or a list of either (a batch, decoded together on a
        fused graph). Greedy by default; ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
        ``repetition_penalty`` and ``seed`` as transformers' ``generate`` takes them. Generation ends at a string of
        ``stop``, which the text does not include."""
        tok = self.tokenizer
        single = isinstance(prompt, str) or _is_conversation(prompt)
        prompts = [tok.encode(p, chat) for p in ([prompt] if single else prompt)]
        stops = tuple(stop)
        check = (lambda _row, out: stop_at(tok.decode(out), stops) is not None) if stops else None
        results = self._generate(prompts, self._adapters.key(adapter, scale), max_new_tokens, min_new_tokens, None, None,
                                 self._sampling(sampling), check)  # fmt: skip
        answers = []
        for ids, (out, reason) in zip(prompts, results):
            text = tok.decode(out)
            text = text[: stop_at(text, stops)] if reason == "stop" else text
            answers.append(GenerationResult(text, out, len(ids), reason) if return_result else text)
        return answers[0] if single else answers

    @staticmethod
    def _sampling(options: dict) -> Sampling:
        try:
            return Sampling(**options)
        except TypeError:
            unknown = sorted(set(options) - set(Sampling.__dataclass_fields__))
            raise RuntimeInputError(f"unknown generation option {unknown[0]!r}; the sampling options are "
                                    f"{', '.join(Sampling.__dataclass_fields__)}") from None  # fmt: skip
