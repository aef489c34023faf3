"""One ONNX Runtime session per package, shared by every adapter: loading, the package's facts, and per-call
bindings of an adapter's tensors.

Each call binds the chosen adapter's tensors (read once from its .onnx_adapter file) to the graph's LoRA inputs
on an IOBinding; an unbound LoRA input keeps its zero default, which is the base model. This is what
``RunOptions.add_active_adapter`` does, but it also works on the IOBinding path, which generation needs to let
GroupQueryAttention write the KV cache in place (ONNX Runtime ignores active adapters there). Calls share
nothing mutable, so concurrent calls with different adapters are independent.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnxruntime as ort

from ..adapters.storage import Storage
from ..config import Target
from ..errors import PackageError, RuntimeInputError
from ..package.manifest import Manifest
from ..package.store import read_manifest
from .adapter_set import AdapterChoice, AdapterSet
from .pages import RowReadPages, after_loading, evict_cached
from .tokenizer import Tokenizer

AdapterTensors = Mapping[str, ort.OrtValue]


class PackageModel:
    """What decoders and encoders share: the session, the manifest, the adapters and their bindings.
    ``adapter=None`` everywhere means the base model exactly."""

    def __init__(self, root: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.root = root
        self.manifest = manifest
        self.session = session
        spec = manifest.spec
        self.num_layers = spec.num_layers
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.vocab_size = spec.vocab_size
        self.max_length = spec.max_position_embeddings
        self.fused_attention = manifest.graph.fused
        self.dtype = np.dtype(manifest.graph.compute_dtype)  # of the KV cache and LoRA tensors
        self.providers = session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._output_names = [o.name for o in session.get_outputs()]
        self._tokenizer: Tokenizer | None = None
        self._tok_lock = threading.Lock()
        self._pools = threading.local()
        # the shipped adapters, each read when first chosen and checked against the base and the slot layout; on the
        # first provider's device, so binding copies nothing
        self._adapters = AdapterSet(manifest, Storage.of(manifest), self.device)
        for name, file in manifest.adapter_files().items():
            self._adapters.ship(name, root / file)
        weights = manifest.graph.file + ".data"  # the graph's external weights, as the exporter names them
        self._row_pages = RowReadPages(root, weights)
        after_loading(root)
        if not manifest.kernel:  # (the native kernel reads its int4 records and head table where they lie, every call)
            evict_cached(root / weights)

    # -- facts ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self._adapters.names

    @property
    def tokenizer(self) -> Tokenizer:
        with self._tok_lock:
            if self._tokenizer is None:
                if not (self.root / "tokenizer.json").is_file():
                    raise RuntimeInputError(f"package {self.root} has no tokenizer.json; pass token ids instead of text")
                self._tokenizer = Tokenizer(self.root)
                after_loading()  # parsing tokenizer.json frees far more than the tokenizer keeps
            return self._tokenizer

    # -- adapters -------------------------------------------------------------------------
    def check_adapter(self, adapter: AdapterChoice, scale: float = 1.0) -> AdapterTensors:
        """The tensors to bind for ``adapter`` (a name, a blend {name: weight}, or None for the base) at ``scale``;
        one clear line for an unknown name or a bad weight."""
        return self._adapters.tensors(self._adapters.key(adapter, scale))

    def load_adapter(self, name: str, path: Path | str) -> None:
        """Load an adapter at run time: an .onnx_adapter file compiled for this package, or a PEFT adapter directory
        (adapter_config.json + adapter_model.safetensors, converted with numpy). Calls in flight are not disturbed."""
        self._adapters.load(name, Path(path))
        after_loading()  # the code that read and converted it runs once per adapter

    def add_adapter(self, name: str, tensors: Mapping[str, np.ndarray | ort.OrtValue]) -> None:
        """Make ``tensors`` (graph input name -> array, as an adapter file holds them) usable as ``adapter=name``."""
        self._adapters.add(name, tensors)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; its memory is returned once no call in flight uses it."""
        self._adapters.remove(name)

    # -- bindings -------------------------------------------------------------------------
    def binding(self, adapter: AdapterChoice, scale: float = 1.0) -> ort.IOBinding:
        """A new IOBinding with ``adapter``'s tensors bound (what the first call with an adapter on a thread costs)."""
        return self._binding(self._adapters.key(adapter, scale))

    def _binding(self, key) -> ort.IOBinding:
        io = self.session.io_binding()
        for name, value in self._adapters.tensors(key).items():
            io.bind_ortvalue_input(name, value)
        return io

    @contextlib.contextmanager
    def bound(self, adapter: AdapterChoice, scale: float = 1.0) -> Iterator[ort.IOBinding]:
        """An IOBinding with ``adapter`` bound, from this thread's pool: switching between adapters a thread has
        used costs a list pop, not a rebind (per thread, so concurrent calls never share one). On exit the
        call's buffers are let go: outputs unbound, KV cache inputs pointed at an empty tensor."""
        key = self._adapters.key(adapter, scale)
        pools = self._pools.__dict__
        if pools.get("generation") != self._adapters.generation:  # the adapter set changed: old bindings are stale
            pools.clear()
            pools["generation"] = self._adapters.generation
        pool = pools.setdefault("by_adapter", {}).setdefault(key, [])
        io = pool.pop() if pool else self._binding(key)
        try:
            yield io
        finally:
            self._reset(io)
            pool.append(io)

    def _reset(self, io: ort.IOBinding) -> None:
        io.clear_binding_outputs()

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

    def run_bound(self, io: ort.IOBinding) -> None:
        """One graph call on ``io``; then the package's pages that the call read a few rows of are handed back."""
        self.session.run_with_iobinding(io)
        self._row_pages.release()

    def _run(self, io: ort.IOBinding) -> list[np.ndarray]:
        for name in self._output_names:
            io.bind_output(name)
        self.run_bound(io)
        return io.copy_outputs_to_cpu()


# -- loading ----------------------------------------------------------------------------------
def providers_for(target: Target) -> list[str]:
    """Execution providers to ask for, in order, for a package built for ``target``."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if target is Target.CUDA else ["CPUExecutionProvider"]


def load(path, threads: int | None = None, providers: list[str] | None = None, verify: bool = True,
         profile_prefix: str | None = None) -> PackageModel:  # fmt: skip
    """Load a package; checks the manifest, every checksum (``verify``) and every adapter's identity.

    ``providers``: ONNX Runtime execution providers in order of preference (e.g.
    ``["CUDAExecutionProvider", "CPUExecutionProvider"]``); a name missing from this onnxruntime is a
    clear error. Default: the package's target (cuda packages ask for CUDA when it is installed, and
    say so on stderr when it is not), else the CPU. Adapters and the KV cache live on the first
    provider's device.

    ``profile_prefix`` turns on ONNX Runtime's per-operator profiler (``model.session.end_profiling()``
    writes the trace); it slows every call, so use it only to see where time goes."""
    from .decoder import DecoderModel
    from .encoder import EncoderModel

    root = Path(path)
    after_loading()  # what importing read once: the session is built beside less
    manifest = read_manifest(root, verify=verify)
    session = open_session(root, manifest, session_options(root, manifest, threads, profile_prefix), providers)
    check_graph(root, manifest, session)
    kind = EncoderModel if manifest.spec.is_encoder else DecoderModel
    return kind(root, manifest, session)


def session_options(root: Path, manifest: Manifest, threads: int | None, profile_prefix: str | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns once per overridable initializer; they are intended
    # ONNX Runtime plans and keeps one memory pattern per set of input shapes, and a decoder's shapes change every
    # step (the attention mask grows by one): SmolLM2's int4 package held 3 MiB more at 128 tokens, at the same speed
    opts.enable_mem_pattern = False
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    q = manifest.quantization
    if q.accuracy_level == 4 and (q.weights.bits or q.embeddings.bits):
        # MatMulNBits with int8 activations quantized per block of the weights, as verify measured the package. On
        # aarch64 CPUs with dot-product instructions ONNX Runtime's KleidiAI kernels take over and quantize each
        # activation row at once: on the real int4 package (emulated, 128 tokens) 5x the KL divergence from PyTorch
        # (1.6e-2 against x86's 3.2e-3), where MLAS's own ARM kernels give x86's (2.8e-3). Ignored elsewhere.
        opts.add_session_config_entry("mlas.disable_kleidiai", "1")
    kernel = manifest.kernel
    if kernel:  # the package's branches (and int4 projections) are lora_edge nodes
        from ..native.contract import KERNEL_VERSION
        from ..native.register import register

        if kernel.name != "native" or not 1 <= kernel.version <= KERNEL_VERSION:
            raise PackageError(f"{root} needs LoRA kernel {kernel.name} v{kernel.version}, and this lora-edge "
                               f"has native v{KERNEL_VERSION}; re-export the package with this version")  # fmt: skip
        register(opts, root, kernel.version)
    return opts


def check_graph(root: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
    """The manifest describes this graph: a decoder's KV-cache inputs are one key and one value per layer of the
    spec's heads and head size, and the logits span the vocabulary (else the first call would fail deep inside)."""
    spec = manifest.spec
    inputs = {i.name: i.shape for i in session.get_inputs()}
    past = {n for n in inputs if n.startswith("past_key_values.")}
    if not spec.is_encoder:
        want = {f"past_key_values.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")} \
            if len(past) == 2 * spec.num_layers else set()  # (a huge num_layers is refused before building it)
        def fits(shape) -> bool:  # (batch, kv heads, past length, head size); symbolic sizes fit anything
            return len(shape) == 4 and all(not isinstance(d, int) or d == w for d, w in ((shape[1], spec.num_kv_heads), (shape[3], spec.head_dim)))

        shapes_ok = all(fits(inputs[n]) for n in past)
        if past != want or not shapes_ok:
            raise PackageError(f"{root}: manifest.json describes {spec.num_layers} layers of {spec.num_kv_heads} x {spec.head_dim} "
                               f"KV heads, and {manifest.graph.file} has {len(past) // 2} other ones; re-export the package")  # fmt: skip
    logits = next((o.shape for o in session.get_outputs() if o.name == "logits"), None)
    if logits and isinstance(logits[-1], int) and not spec.is_encoder and logits[-1] != spec.vocab_size:
        raise PackageError(f"{root}: manifest.json says a vocabulary of {spec.vocab_size}, {manifest.graph.file} gives "
                           f"{logits[-1]} logits; re-export the package")  # fmt: skip


def open_session(root: Path, manifest: Manifest, opts: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
    available = ort.get_available_providers()
    if not providers:
        wanted = providers_for(manifest.graph.target)
        providers = [p for p in wanted if p in available]
        if wanted[0] not in providers:
            import logging  # (here: importing it costs every device process 0.4 MiB, for this one note)

            logging.getLogger("lora_edge").warning(
                f"note: {root} is built for {manifest.graph.target} but this onnxruntime has no {wanted[0]} "
                f"(available: {', '.join(available)}); running on {providers[0]}"
            )
    for p in providers:
        if p not in available:
            raise RuntimeInputError(f"execution provider {p!r} is not available in this onnxruntime (available: {', '.join(available)})")
    graph_file = root / manifest.graph.file
    try:
        session = ort.InferenceSession(str(graph_file), opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types
        raise PackageError(f"onnxruntime cannot load {graph_file}: {str(exc).splitlines()[0]}") from None
    return session
