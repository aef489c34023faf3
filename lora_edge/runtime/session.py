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
import logging
import threading
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnxruntime as ort

from ..config import Mode, Target
from ..errors import PackageError, RuntimeInputError
from ..package.manifest import Manifest
from ..package.store import read_manifest
from .adapters import check_adapter_tensors, load_adapter_file, slot_shapes
from .tokenizer import Tokenizer

AdapterTensors = Mapping[str, ort.OrtValue]


class PackageModel:
    """What decoders and encoders share: the session, the manifest, the adapters and their bindings.
    ``adapter=None`` everywhere means the base model exactly."""

    def __init__(self, root: Path, manifest: Manifest, session: ort.InferenceSession, adapters: dict[str, AdapterTensors]) -> None:
        self.root = root
        self.manifest = manifest
        self.session = session
        self._adapters = dict(adapters)
        self._adapters_lock = threading.Lock()
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
        self._slot_inputs = slot_shapes(manifest.slots)

    # -- facts ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    @property
    def tokenizer(self) -> Tokenizer:
        with self._tok_lock:
            if self._tokenizer is None:
                if not (self.root / "tokenizer.json").is_file():
                    raise RuntimeInputError(f"package {self.root} has no tokenizer.json; pass token ids instead of text")
                self._tokenizer = Tokenizer(self.root)
            return self._tokenizer

    # -- adapters -------------------------------------------------------------------------
    def check_adapter(self, adapter: str | None) -> AdapterTensors:
        """The tensors to bind for ``adapter`` (empty for the base); a clear error for an unknown name."""
        if adapter is None:
            return {}
        tensors = self._adapters.get(adapter)
        if tensors is None:
            avail = ", ".join(self.adapters) or "none"
            if self.manifest.mode is Mode.MERGE and adapter in self.manifest.adapters:
                raise RuntimeInputError(f"adapter {adapter!r} is merged into this package's weights; run without --adapter")
            raise RuntimeInputError(f"unknown adapter {adapter!r}; this package has: {avail}")
        return tensors

    def add_adapter(self, name: str, tensors: Mapping[str, np.ndarray | ort.OrtValue]) -> None:
        """Make ``tensors`` (graph input name -> array, as an adapter file holds them) usable as ``adapter=name``.
        They are checked against the graph's LoRA inputs; calls in flight keep the tensors they started with."""
        shapes = {k: tuple(v.shape() if isinstance(v, ort.OrtValue) else v.shape) for k, v in tensors.items()}
        check_adapter_tensors("tensors", name, shapes, self._slot_inputs)
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0)
                  for k, v in tensors.items()}  # fmt: skip
        with self._adapters_lock:
            self._adapters = {**self._adapters, name: values}  # a new dict: readers never see it change
        self._pools = threading.local()  # bindings pooled under this name are stale

    def remove_adapter(self, name: str) -> None:
        self.check_adapter(name)
        with self._adapters_lock:
            self._adapters = {k: v for k, v in self._adapters.items() if k != name}
        self._pools = threading.local()

    # -- bindings -------------------------------------------------------------------------
    def binding(self, adapter: str | None) -> ort.IOBinding:
        """A new IOBinding with ``adapter``'s tensors bound (what the first call with an adapter on a thread costs)."""
        io = self.session.io_binding()
        for name, value in self.check_adapter(adapter).items():
            io.bind_ortvalue_input(name, value)
        return io

    @contextlib.contextmanager
    def bound(self, adapter: str | None) -> Iterator[ort.IOBinding]:
        """An IOBinding with ``adapter`` bound, from this thread's pool: switching between adapters a thread has
        used costs a list pop, not a rebind (per thread, so concurrent calls never share one). On exit the
        call's buffers are let go: outputs unbound, KV cache inputs pointed at an empty tensor."""
        pool = self._pools.__dict__.setdefault("by_adapter", {}).setdefault(adapter, [])
        io = pool.pop() if pool else self.binding(adapter)
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

    def _run(self, io: ort.IOBinding) -> list[np.ndarray]:
        for name in self._output_names:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
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
    manifest = read_manifest(root, verify=verify)
    session = open_session(root, manifest, session_options(root, manifest, threads, profile_prefix), providers)
    adapters = {name: load_adapter_file(root / file, name, manifest.base.identity, slot_shapes(manifest.slots))
                for name, file in manifest.adapter_files().items()}  # fmt: skip
    if session.get_providers()[0] == "CUDAExecutionProvider":  # keep the adapters on the GPU: binding copies nothing
        adapters = {n: {k: ort.OrtValue.ortvalue_from_numpy(v.numpy(), "cuda", 0) for k, v in t.items()} for n, t in adapters.items()}
    kind = EncoderModel if manifest.spec.is_encoder else DecoderModel
    return kind(root, manifest, session, adapters)


def session_options(root: Path, manifest: Manifest, threads: int | None, profile_prefix: str | None) -> ort.SessionOptions:
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
    kernel = manifest.kernel
    if kernel:  # the package's branches (and int4 projections) are lora_edge nodes
        from ..native.contract import KERNEL_VERSION
        from ..native.register import register

        if kernel.name != "native" or not 1 <= kernel.version <= KERNEL_VERSION:
            raise PackageError(f"{root} needs LoRA kernel {kernel.name} v{kernel.version}, and this lora-edge "
                               f"has native v{KERNEL_VERSION}; re-export the package with this version")  # fmt: skip
        register(opts, root, kernel.version)
    return opts


def open_session(root: Path, manifest: Manifest, opts: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
    available = ort.get_available_providers()
    if not providers:
        wanted = providers_for(manifest.graph.target)
        providers = [p for p in wanted if p in available]
        if wanted[0] not in providers:
            logging.getLogger("lora_edge").warning(
                f"note: {root} is built for {manifest.graph.target} but this onnxruntime has no {wanted[0]} "
                f"(available: {', '.join(available)}); running on {providers[0]}"
            )
    for p in providers:
        if p not in available:
            raise RuntimeInputError(f"execution provider {p!r} is not available in this onnxruntime (available: {', '.join(available)})")
    graph_file = root / manifest.graph.file
    try:
        return ort.InferenceSession(str(graph_file), opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types
        raise PackageError(f"onnxruntime cannot load {graph_file}: {str(exc).splitlines()[0]}") from None
