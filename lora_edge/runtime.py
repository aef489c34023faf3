"""Run a package on the device: load once, pick the adapter per call. No torch, no transformers.

One ONNX Runtime session serves every adapter. Each call builds its own IOBinding and binds the
chosen adapter's tensors (read once from its .onnx_adapter file) to the graph's LoRA inputs; an
unbound LoRA input keeps its zero default, which is the base model. This is what
``RunOptions.add_active_adapter`` does, but it also works on the IOBinding path, which generation
needs to let GroupQueryAttention write the KV cache in place (ONNX Runtime ignores active adapters
there). Calls share nothing mutable, so concurrent calls with different adapters are independent.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from .errors import PackageError, RuntimeInputError
from .native import W8A8_BLOB
from .package import read_manifest


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "length"


class _Tokenizer:
    """tokenizers + the chat template (jinja2, as transformers renders it)."""

    def __init__(self, root: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        cfg = _json(root / "tokenizer_config.json")
        gen = _json(root / "generation_config.json")
        self.chat_template = cfg.get("chat_template")
        if not self.chat_template and (root / "chat_template.jinja").is_file():
            self.chat_template = (root / "chat_template.jinja").read_text()
        self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.special.items()}
        eos = gen.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.special["eos_token"] and self.tok.token_to_id(self.special["eos_token"]) is not None:
            eos_ids.add(self.tok.token_to_id(self.special["eos_token"]))
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_id = self.tok.token_to_id(self.special["bos_token"]) if self.special["bos_token"] else None

    def render_chat(self, messages: list[dict]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise RuntimeInputError(f"the chat template refused the conversation: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        try:
            return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as exc:
            raise PackageError(f"the package's chat template does not render: {exc}") from None

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat and self.chat_template:
            text = self.render_chat([{"role": "user", "content": text}])
            ids = self.tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); re-export the package") from None


class Model:
    """A loaded package. ``adapter=None`` everywhere means the base model exactly."""

    def __init__(self, root: Path, manifest: dict, session: ort.InferenceSession, adapters: dict[str, dict[str, ort.OrtValue]]) -> None:
        self.root = root
        self.manifest = manifest
        self.session = session
        self._adapters = adapters
        spec = manifest["base"]["spec"]
        self.num_layers = spec["num_layers"]
        self.num_kv_heads = spec["num_kv_heads"]
        self.head_dim = spec["head_dim"]
        self.vocab_size = spec["vocab_size"]
        self.max_length = spec["max_position_embeddings"]
        self._tokenizer: _Tokenizer | None = None
        self._tok_lock = threading.Lock()
        self._output_names = [o.name for o in session.get_outputs()]
        self.fused_attention = manifest.get("graph", {}).get("attention") == "fused"
        self.dtype = np.dtype(manifest.get("graph", {}).get("compute_dtype", "float32"))  # of the KV cache and LoRA tensors
        self.providers = session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._pools = threading.local()
        inputs = {i.name for i in session.get_inputs()}  # (an encoder has no KV cache)
        self._past_names = [n for i in range(self.num_layers) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
                            if n in inputs]  # layer order, key then value: the order of ``past`` lists  # fmt: skip
        self._empty_past = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.dtype), self.device, 0)

    # -- facts ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    @property
    def tokenizer(self) -> _Tokenizer:
        with self._tok_lock:
            if self._tokenizer is None:
                if not (self.root / "tokenizer.json").is_file():
                    raise RuntimeInputError(f"package {self.root} has no tokenizer.json; pass token ids instead of text")
                self._tokenizer = _Tokenizer(self.root)
            return self._tokenizer

    def check_adapter(self, adapter: str | None) -> dict[str, ort.OrtValue]:
        """The tensors to bind for ``adapter`` (empty for the base); a clear error for an unknown name."""
        if adapter is None:
            return {}
        if adapter not in self._adapters:
            avail = ", ".join(self.adapters) or "none"
            if self.manifest.get("mode") == "merge" and adapter in self.manifest.get("adapters", {}):
                raise RuntimeInputError(f"adapter {adapter!r} is merged into this package's weights; run without --adapter")
            raise RuntimeInputError(f"unknown adapter {adapter!r}; this package has: {avail}")
        return self._adapters[adapter]

    def _binding(self, adapter: str | None) -> ort.IOBinding:
        """A new IOBinding with ``adapter``'s tensors bound (binding 240 tensors takes ~0.1 ms)."""
        io = self.session.io_binding()
        for name, value in self.check_adapter(adapter).items():
            io.bind_ortvalue_input(name, value)
        return io

    def _acquire(self, adapter: str | None) -> ort.IOBinding:
        """An IOBinding with ``adapter`` bound, from this thread's pool: switching between adapters a
        thread has used costs a list pop, not a rebind. (Per thread, so concurrent calls never share one.)"""
        pools = self._pools.__dict__.setdefault("by_adapter", {})
        pool = pools.setdefault(adapter, [])
        return pool.pop() if pool else self._binding(adapter)

    def _release(self, adapter: str | None, io: ort.IOBinding) -> None:
        """Back to the pool, without the call's buffers: outputs unbound, the KV cache inputs pointed at
        an empty tensor (so a pooled binding never keeps a cache alive). Every call rebinds all its
        inputs, so nothing stale is ever read."""
        io.clear_binding_outputs()
        for name in self._past_names:
            io.bind_ortvalue_input(name, self._empty_past)
        self._pools.__dict__.setdefault("by_adapter", {}).setdefault(adapter, []).append(io)

    @contextlib.contextmanager
    def _bound(self, adapter: str | None) -> Iterator[ort.IOBinding]:
        io = self._acquire(adapter)
        try:
            yield io
        finally:
            self._release(adapter, io)

    def _as_ids(self, input_ids) -> np.ndarray:
        """``input_ids`` as an int64 (batch, seq) array; a clear error for a wrong shape or an id outside the vocabulary."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeInputError(f"input_ids must be (batch, seq) with seq > 0, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise RuntimeInputError(f"input_ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids

    def _default_eos(self) -> frozenset[int]:
        return self.tokenizer.eos_ids if (self.root / "tokenizer.json").is_file() else frozenset()

    def _bind_cache(self, io: ort.IOBinding, batch: int, capacity: int) -> None:
        """Bind a zeroed KV cache for ``capacity`` tokens as both past and present of every layer, so
        GroupQueryAttention writes each step's keys/values in place; the logits output is bound first
        (``get_outputs()[0]``). The binding holds the cache until it is rebound or released."""
        io.bind_output("logits")
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        for name in self._past_names:
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype), self.device, 0)
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.dtype)
        return [z] * (2 * self.num_layers)

    # -- one graph call -------------------------------------------------------------------
    def forward(
        self,
        input_ids,
        adapter: str | None = None,
        attention_mask=None,
        position_ids=None,
        past: list[np.ndarray] | None = None,
        return_past: bool = False,
    ):
        """Logits (batch, seq, vocab) for ``input_ids`` (batch, seq); optionally the new KV cache."""
        ids = self._as_ids(input_ids)
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
        with self._bound(adapter) as io:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
            for name, value in zip(self._past_names, past):  # as OrtValues: _release then drops them
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, self.dtype)))
            for name in self._output_names:
                io.bind_output(name)
            self.session.run_with_iobinding(io)
            outs = io.copy_outputs_to_cpu()
        return (outs[0], outs[1:]) if return_past else outs[0]

    # -- generation -----------------------------------------------------------------------
    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None = None,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        on_token: Callable[[int], None] | None = None,
        eos_ids: frozenset[int] | None = None,
    ) -> tuple[list[int], str]:
        """Greedy decoding from token ids: prefill in one call, then one call per new token."""
        if max_new_tokens < 0 or min_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens and min_new_tokens must be >= 0")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise RuntimeInputError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.max_length:
            raise RuntimeInputError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's context of "
                f"{self.max_length} tokens; shorten the prompt or lower max_new_tokens"
            )
        if eos_ids is None:
            eos_ids = self._default_eos()
        if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size):
            raise RuntimeInputError(f"token ids must lie in [0, {self.vocab_size})")
        if not self.fused_attention:
            return self._greedy(self._plain_steps(adapter), prompt_ids, max_new_tokens, min_new_tokens, on_token, eos_ids)
        with self._bound(adapter) as io:
            step = self._fused_steps(adapter, len(prompt_ids) + max_new_tokens, 1, io)
            return self._greedy(step, prompt_ids, max_new_tokens, min_new_tokens, on_token, eos_ids)

    def _greedy(self, step, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int, on_token, eos_ids) -> tuple[list[int], str]:
        out: list[int] = []
        ids = np.asarray([prompt_ids], np.int64)
        total = len(prompt_ids)
        reason = "length"
        while len(out) < max_new_tokens:
            last = step(ids, total)[0]
            if len(out) < min_new_tokens and eos_ids:
                last = last.copy()
                last[list(eos_ids)] = -np.inf
            nxt = int(np.argmax(last))
            if nxt in eos_ids:
                reason = "eos"
                break
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            ids = np.asarray([[nxt]], np.int64)
            total += 1
        return out, reason

    def steps(self, adapter: str | None, capacity: int, batch: int = 1) -> Callable[[np.ndarray, int], np.ndarray]:
        """A decoding loop's step function: ``step(ids (batch, s), total) -> last logits (batch, vocab)``,
        where ``total`` counts the tokens so far including ``ids`` (rows of equal length, no padding)."""
        return self._fused_steps(adapter, capacity, batch) if self.fused_attention else self._plain_steps(adapter, batch)

    def _fused_steps(self, adapter: str | None, capacity: int, batch: int = 1, io: ort.IOBinding | None = None):
        """One decoding step per call, on one IOBinding: the KV cache is preallocated for ``capacity``
        tokens and GroupQueryAttention writes each new key/value into it in place (past and present
        bound to the same buffer), so nothing is copied or reallocated per token."""
        io = io if io is not None else self._binding(adapter)
        self._bind_cache(io, batch, capacity)
        ones = np.ones((batch, capacity), np.int64)
        positions = np.repeat(np.arange(capacity, dtype=np.int64)[None], batch, axis=0)

        def step(ids: np.ndarray, total: int) -> np.ndarray:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", ones[:, :total])
            io.bind_cpu_input("position_ids", positions[:, total - ids.shape[1] : total])
            io.bind_output("logits")
            self.session.run_with_iobinding(io)
            return io.get_outputs()[0].numpy()[:, -1]

        return step

    def _plain_steps(self, adapter: str | None, batch: int = 1):
        """Reference graphs: the KV cache comes back as new arrays each step."""
        state = {"past": self.empty_past(batch)}

        def step(ids: np.ndarray, total: int) -> np.ndarray:
            positions = np.repeat(np.arange(total - ids.shape[1], total, dtype=np.int64)[None], batch, axis=0)
            logits, state["past"] = self.forward(ids, adapter, attention_mask=np.ones((batch, total), np.int64),
                                                 position_ids=positions, past=state["past"], return_past=True)  # fmt: skip
            return logits[:, -1]

        return step

    def stream(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64, chat: bool = True, **kw) -> Iterator[str]:
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
        adapter: str | None = None,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        chat: bool = True,
        return_result: bool = False,
    ):
        """Greedy completion of ``prompt``; the chat template is applied when the package has one and ``chat``.

        A list of prompts gives a list of answers, decoded together as one batch on the fused graph
        (:meth:`generate_ids_batch`), one after another on a reference graph."""
        tok = self.tokenizer
        if not isinstance(prompt, str):
            prompts = [tok.encode(p, chat) for p in prompt]
            if self.fused_attention and len(prompts) > 1:
                results = self.generate_ids_batch(prompts, adapter, max_new_tokens, min_new_tokens)
            else:
                results = [self.generate_ids(ids, adapter, max_new_tokens, min_new_tokens) for ids in prompts]
            return [GenerationResult(tok.decode(out), out, len(ids), reason) if return_result else tok.decode(out)
                    for ids, (out, reason) in zip(prompts, results)]  # fmt: skip
        ids = tok.encode(prompt, chat)
        out, reason = self.generate_ids(ids, adapter, max_new_tokens, min_new_tokens)
        text = tok.decode(out)
        if return_result:
            return GenerationResult(text=text, token_ids=out, prompt_tokens=len(ids), finish_reason=reason)
        return text

    def generate_ids_batch(self, prompts: Sequence[Sequence[int]], adapter: str | None = None, max_new_tokens: int = 64,
                           min_new_tokens: int = 0, eos_ids: frozenset[int] | None = None) -> list[tuple[list[int], str]]:  # fmt: skip
        """Greedy decoding of several prompts of any lengths as one batch (fused graphs): the prompts are
        right-padded and prefilled in one call; then each step feeds every row its next token. The
        attention mask carries each row's length (GroupQueryAttention reads it as seqlens), so every row
        attends to its own tokens only and writes its keys/values at its own position of the shared
        cache. Rows that finished keep computing until all have (their outputs are not used). Returns
        (tokens, "eos"|"length") per prompt, exactly what :meth:`generate_ids` gives for each alone."""
        if not self.fused_attention:
            return [self.generate_ids(p, adapter, max_new_tokens, min_new_tokens, eos_ids=eos_ids) for p in prompts]
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise RuntimeInputError("every prompt needs at least one token")
        if max_new_tokens < 0 or min_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens and min_new_tokens must be >= 0")
        lens = np.array([len(p) for p in prompts], np.int64)
        if lens.max() + max_new_tokens > self.max_length:
            raise RuntimeInputError(f"the longest prompt ({lens.max()} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                                    f"model's context of {self.max_length} tokens")  # fmt: skip
        if min(min(p) for p in prompts) < 0 or max(max(p) for p in prompts) >= self.vocab_size:
            raise RuntimeInputError(f"token ids must lie in [0, {self.vocab_size})")
        if eos_ids is None:
            eos_ids = self._default_eos()
        if max_new_tokens == 0:
            return [([], "length") for _ in prompts]
        with self._bound(adapter) as io:
            return self._batch_loop(io, prompts, lens, max_new_tokens, min_new_tokens, eos_ids)

    def _batch_loop(self, io, prompts, lens, max_new_tokens: int, min_new_tokens: int, eos_ids) -> list[tuple[list[int], str]]:
        b, width = len(prompts), int(lens.max())
        capacity = width + max_new_tokens
        self._bind_cache(io, b, capacity)
        columns = np.arange(capacity, dtype=np.int64)

        def step(ids: np.ndarray, positions: np.ndarray, total: np.ndarray) -> np.ndarray:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", (columns[None, : int(total.max())] < total[:, None]).astype(np.int64))
            io.bind_cpu_input("position_ids", positions)
            io.bind_output("logits")
            self.session.run_with_iobinding(io)
            return io.get_outputs()[0].numpy()

        ids = np.zeros((b, width), np.int64)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        logits = step(ids, np.repeat(columns[None, :width], b, axis=0), lens)
        last = logits[np.arange(b), lens - 1]  # each row's last real token
        outs: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        active = np.ones(b, bool)
        eos = list(eos_ids)
        for produced in range(max_new_tokens):
            if produced < min_new_tokens and eos:
                last = last.copy()
                last[:, eos] = -np.inf
            nxt = np.argmax(last, axis=-1)
            for r in np.flatnonzero(active):
                if int(nxt[r]) in eos_ids:
                    active[r], reasons[r] = False, "eos"
                else:
                    outs[r].append(int(nxt[r]))
                    if len(outs[r]) >= max_new_tokens:
                        active[r] = False
            if not active.any():
                break
            logits = step(nxt[:, None].astype(np.int64), lens[:, None].copy(), lens + 1)
            lens = lens + 1
            last = logits[:, -1]
        return list(zip(outs, reasons))


def load(path, threads: int | None = None, providers: list[str] | None = None, verify: bool = True,
         profile_prefix: str | None = None) -> Model:  # fmt: skip
    """Load a package; checks the manifest, every checksum (``verify``) and every adapter's identity.

    ``providers``: ONNX Runtime execution providers in order of preference (e.g.
    ``["CUDAExecutionProvider", "CPUExecutionProvider"]``); a name missing from this onnxruntime is a
    clear error. Default: the package's target (cuda packages ask for CUDA when it is installed, and
    say so on stderr when it is not), else the CPU. Adapters and the KV cache live on the first
    provider's device.

    ``profile_prefix`` turns on ONNX Runtime's per-operator profiler (``model.session.end_profiling()``
    writes the trace); it slows every call, so use it only to see where time goes."""
    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    try:
        return _load(root, manifest, threads, providers, profile_prefix)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        if isinstance(exc, RuntimeInputError | PackageError):
            raise
        raise PackageError(f"{root / 'manifest.json'} is malformed ({type(exc).__name__}: {exc}); re-export the package") from None


def _load(root: Path, manifest: dict, threads: int | None, providers: list[str] | None, profile_prefix: str | None) -> Model:
    graph_file = root / manifest.get("graph", {}).get("file", "model.onnx")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns once per overridable initializer; they are intended
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    kernel = manifest.get("graph", {}).get("lora_kernel")
    if kernel:  # the package's branches (and int4 offsets, v3) are lora_edge nodes (lora_edge/native)
        from .native import KERNEL_VERSION, register

        version = kernel.get("version")
        if kernel.get("name") != "native" or not isinstance(version, int) or not 1 <= version <= KERNEL_VERSION:
            raise PackageError(f"{root} needs LoRA kernel {kernel.get('name')} v{kernel.get('version')}, and this lora-edge "
                               f"has native v{KERNEL_VERSION}; re-export the package with this version")  # fmt: skip
        register(opts, root, version)
    available = ort.get_available_providers()
    if not providers:
        from .targets import providers_for

        target = manifest.get("graph", {}).get("target", "cpu")
        providers = [p for p in providers_for(target) if p in available]
        if providers_for(target)[0] not in providers:
            import logging

            logging.getLogger("lora_edge").warning(
                f"note: {root} is built for {target} but this onnxruntime has no {providers_for(target)[0]} "
                f"(available: {', '.join(available)}); running on {providers[0]}"
            )
    for p in providers:
        if p not in available:
            raise RuntimeInputError(f"execution provider {p!r} is not available in this onnxruntime (available: {', '.join(available)})")
    try:
        session = ort.InferenceSession(str(graph_file), opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types
        raise PackageError(f"onnxruntime cannot load {graph_file}: {str(exc).splitlines()[0]}") from None

    slot_inputs = slot_shapes(manifest.get("slots", []))
    # (ranks of a slot's A and B must agree: checked per file below)
    identity = manifest["base"]["identity"]
    adapters: dict[str, dict[str, ort.OrtValue]] = {}
    for name, info in sorted(manifest.get("adapters", {}).items()):
        if not info.get("file"):
            continue
        adapters[name] = _load_adapter(root / info["file"], name, identity, slot_inputs)
    if session.get_providers()[0] == "CUDAExecutionProvider":  # keep the adapters on the GPU: binding copies nothing
        adapters = {n: {k: ort.OrtValue.ortvalue_from_numpy(v.numpy(), "cuda", 0) for k, v in t.items()} for n, t in adapters.items()}
    if manifest["base"]["spec"].get("kind", "decoder") == "encoder":
        return EncoderModel(root, manifest, session, adapters)
    return Model(root, manifest, session, adapters)


class EncoderModel(Model):
    """A BERT-style encoder package: ``forward`` gives the last hidden state (and classification logits);
    ``embed`` mean-pools sentences; ``classify`` gives label probabilities. Adapters as for decoders."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        spec = self.manifest["base"]["spec"]
        self.num_labels = spec.get("num_labels", 0)
        self.position_offset = spec.get("position_offset", -1)
        self.has_token_types = bool(spec.get("type_vocab_size"))

    def forward(self, input_ids, adapter: str | None = None, attention_mask=None, token_type_ids=None, **_ignored) -> dict[str, np.ndarray]:
        """{"last_hidden_state": (batch, seq, hidden), "logits": (batch, num_labels) for a classifier}."""
        ids = self._as_ids(input_ids)
        if ids.shape[1] > self.max_length:
            raise RuntimeInputError(f"{ids.shape[1]} tokens exceed the model's {self.max_length} positions; shorten the text")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64).reshape(ids.shape)
        if self.position_offset >= 0:  # RoBERTa: count the non-padding tokens, starting after pad_token_id
            real = (ids != self.position_offset).astype(np.int64)
            positions = np.cumsum(real, axis=1) * real + self.position_offset
        else:
            positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        with self._bound(adapter) as io:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
            if self.has_token_types:
                types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64).reshape(ids.shape)
                io.bind_cpu_input("token_type_ids", types)
            for name in self._output_names:
                io.bind_output(name)
            self.session.run_with_iobinding(io)
            return dict(zip(self._output_names, io.copy_outputs_to_cpu()))

    def _batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = [self.tokenizer.tok.encode(t, add_special_tokens=True).ids[: self.max_length] for t in texts]
        n = max(len(e) for e in enc)
        pad = self.tokenizer.tok.token_to_id(self.tokenizer.special.get("pad_token") or "") or 0
        ids = np.full((len(enc), n), pad, np.int64)
        mask = np.zeros((len(enc), n), np.int64)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        return ids, mask

    def embed(self, texts: Sequence[str], adapter: str | None = None, normalize: bool = True) -> np.ndarray:
        """Mean-pooled sentence embeddings (batch, hidden), as sentence-transformers computes them."""
        ids, mask = self._batch([texts] if isinstance(texts, str) else list(texts))
        hidden = self.forward(ids, adapter, attention_mask=mask)["last_hidden_state"]
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True) if normalize else pooled

    def classify(self, texts: Sequence[str], adapter: str | None = None) -> np.ndarray:
        """Label probabilities (batch, num_labels), softmax of the classifier's logits."""
        if not self.num_labels:
            raise RuntimeInputError(f"{self.root} is an encoder without a classification head; use embed()")
        ids, mask = self._batch([texts] if isinstance(texts, str) else list(texts))
        logits = self.forward(ids, adapter, attention_mask=mask)["logits"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def generate_ids(self, *args, **kwargs):
        raise RuntimeInputError(f"{self.root} is an encoder (BERT-style) package: it embeds and classifies, it does not generate")

    generate = stream = steps = generate_ids


def slot_shapes(slots: list[dict]) -> dict[str, tuple[str, tuple]]:
    """Every overridable input of the manifest's ``slots``: name -> (slot, expected shape), where an int is
    a fixed size, "r" the slot's rank and "r/N" the rank per module of a chunked B (N modules)."""
    out: dict[str, tuple[str, tuple]] = {}
    for s in slots:
        n, o = s["name"], s["out_features"]
        out[s["lora_A"]] = (n, (s["in_features"], "r"))
        chunks = s.get("lora_B_chunks")  # {"width": c, "modules": [module index of each chunk]}
        out[s["lora_B"]] = (n, (len(chunks["modules"]), f"r/{len(s['parts'])}", chunks["width"]) if chunks else ("r", o))
        if "lora_blob" in s:  # w8a8: its A, B and scales are its part of the one blob (native kernel v5)
            del out[s["lora_A"]], out[s["lora_B"]]
            out[W8A8_BLOB] = ("w8a8 blob", ("bytes",))
        elif s.get("lora_A_scale"):  # int8 A/B (native kernel): one scale per column of A, per row of B
            out[s["lora_A_scale"]] = (n, ("r",))
            out[s["lora_B_scale"]] = (n, out[s["lora_B"]][1][:-1])
        if s.get("weight"):  # a module adapters may replace (modules_to_save): (in, out) and its bias
            out[s["weight"]] = (n, (s["in_features"], o))
            out[s["bias_in"]] = (n, (o,))
        for key in ("lora_M", "lora_bias"):  # per-output-channel vectors (DoRA scale, trained bias change)
            if s.get(key):
                out[s[key]] = (n, (o,))
    return out


def ranked_shapes(slot: dict, rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of a slot's lora_A and lora_B for an adapter of ``rank`` on each of its modules."""
    chunks = slot.get("lora_B_chunks")
    if chunks:
        n = len(slot["parts"])
        return {slot["lora_A"]: (slot["in_features"], n * rank), slot["lora_B"]: (len(chunks["modules"]), rank, chunks["width"])}
    return {slot["lora_A"]: (slot["in_features"], rank), slot["lora_B"]: (rank, slot["out_features"])}


def _load_adapter(path: Path, name: str, identity: int, slot_inputs: dict) -> dict[str, ort.OrtValue]:
    """Read an .onnx_adapter file; check it belongs to this base and this graph."""
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:
        raise PackageError(f"{path} is not a readable ONNX Runtime adapter ({str(exc).splitlines()[0]})") from None
    if fmt.get_model_version() != identity:
        raise PackageError(f"{path} (adapter {name!r}) was compiled for another base model (model_version {fmt.get_model_version()}, this package's base is {identity}); re-export it against this base")
    ranks: dict[str, int] = {}
    params = fmt.get_parameters()
    for pname, value in params.items():
        if pname not in slot_inputs:
            raise PackageError(f"{path} (adapter {name!r}) overrides {pname!r}, which is not a LoRA input of this graph; it belongs to another package")
        slot, want = slot_inputs[pname]
        shape = tuple(value.shape())
        if len(shape) != len(want) or any(isinstance(w, int) and d != w for d, w in zip(shape, want)):
            raise PackageError(f"{path} (adapter {name!r}): {pname} has shape {shape}, which does not fit this graph; it belongs to another package")
        for d, w in zip(shape, want):
            if isinstance(w, str):  # the slot's rank, or the rank per module of a chunked B ("r/N")
                r = d * (int(w[2:]) if w.startswith("r/") else 1)
                if ranks.setdefault(slot, r) != r:
                    raise PackageError(f"{path} (adapter {name!r}): {slot} has lora_A and lora_B of different ranks")
    return dict(params)
