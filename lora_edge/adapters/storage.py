"""An adapter as a package stores it: its graph inputs in the package's dtypes (float32/float16 for standard ops,
the native kernel's float16, int8 or w8a8 blob), written to and read from ONNX Runtime's .onnx_adapter format.

Every file carries what it was compiled for: the base's identity as ONNX Runtime's ``model_version`` and the
package's slot layout as ``adapter_version`` (a 31-bit fingerprint), so a file compiled for another base or layout
is refused before any run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import LoraDtype
from ..errors import AdapterError, PackageError
from ..native.contract import W8A8_BLOB
from ..native.encode import encode
from ..package.manifest import EMBEDDING, INVOCATION_TOKENS, Manifest, SlotInfo
from .layout import Shape, balanced, slot_shapes, slot_tensors
from .peft import Adapter

UNFINGERPRINTED = 1  # the adapter_version of files written before layouts had a fingerprint (schema 1 packages)


@dataclass(frozen=True)
class Storage:
    """What an adapter file is compiled for: a base, the slots of a graph and how the graph takes their tensors."""

    identity: int  # the base's (BaseInfo.identity)
    slots: tuple[SlotInfo, ...]
    dtype: str  # of standard-op LoRA tensors: the graph's compute dtype
    lora_dtype: LoraDtype | None = None  # the native kernel's storage of lora_A / lora_B; None: standard ops
    blob: tuple[tuple[str, str, int, int], ...] = ()  # w8a8: (lora_A, lora_B, chunks, c) per branch in the blob
    alora: bool = False  # the graph has the activated-LoRA mask

    @classmethod
    def of(cls, manifest: Manifest) -> Storage:
        kernel = manifest.kernel
        return cls(manifest.base.identity, manifest.slots, manifest.graph.compute_dtype, kernel.dtype if kernel else None,
                   kernel.blob.slots if kernel and kernel.blob else (), manifest.graph.alora_mask is not None)  # fmt: skip

    @property
    def inputs(self) -> dict[str, tuple[str, Shape]]:
        return slot_shapes(self.slots, W8A8_BLOB)

    @property
    def fingerprint(self) -> int:
        """31 bits of a hash of every LoRA input's name and shape, the dtypes and the blob's order."""
        layout = {"inputs": sorted((k, list(v[1])) for k, v in self.inputs.items()), "dtype": self.dtype,
                  "lora_dtype": self.lora_dtype.value if self.lora_dtype else None, "blob": [list(b) for b in self.blob]}  # fmt: skip
        h = int(hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
        return h if h != UNFINGERPRINTED else h + 1

    # -- compile ----------------------------------------------------------------------------
    def fit(self, adapter: Adapter) -> None:
        """Refuse, in one line naming what is missing, an adapter that needs a branch or an input this package's graph
        was built without; export with the adapter to get one."""
        by_module = {p.module: s for s in self.slots for p in s.parts}
        redo = f"export the base again with it (lora-edge export BASE ... -a {adapter.name}=DIR)"
        if not self.slots:
            raise AdapterError(f"adapter {adapter.name!r}: this package has no LoRA branches (merged, or exported without "
                               f"adapters); {redo}")  # fmt: skip
        for module, lora in adapter.modules.items():
            slot = by_module.get(module)
            if slot is None:
                raise AdapterError(f"adapter {adapter.name!r} targets {module}, which has no LoRA branch in this package; {redo}")
            if lora.dora_scale is not None and not slot.lora_M:
                raise AdapterError(f"adapter {adapter.name!r} is DoRA on {module}, and this package has no DoRA magnitude "
                                   f"input there; {redo}")  # fmt: skip
        for module in adapter.bias_deltas:
            if module not in by_module or not by_module[module].lora_bias:
                raise AdapterError(f"adapter {adapter.name!r} trains the bias of {module}, and this package has no bias input "
                                   f"there; {redo}")  # fmt: skip
        if adapter.invocation_tokens and not self.alora:
            raise AdapterError(f"adapter {adapter.name!r} is an activated LoRA (alora_invocation_tokens), and this package's "
                               f"graph has no activation mask; export the base again with --alora")  # fmt: skip
        for module in adapter.replacements:
            if module not in by_module or not by_module[module].weight:
                raise AdapterError(f"adapter {adapter.name!r} replaces {module} (modules_to_save), and this package cannot; {redo}")

    def tensors(self, adapter: Adapter) -> dict[str, np.ndarray]:
        """The adapter's graph inputs as this package stores them."""
        tensors = slot_tensors(balanced(adapter) if self.lora_dtype else adapter, self.slots)
        pairs = [(s.lora_A, s.lora_B) for s in self.slots if s.name != EMBEDDING]  # (embedding LoRA stays in dtype)
        ab = {n for pair in pairs for n in pair}
        tensors = {name: t if self.lora_dtype and name in ab else t.astype(self.dtype) for name, t in tensors.items()}
        if self.lora_dtype:
            tensors = encode(tensors, pairs, self.lora_dtype, self.blob)
        if adapter.invocation_tokens:
            tensors[INVOCATION_TOKENS] = np.asarray(adapter.invocation_tokens, np.int64)
        return tensors

    def write(self, path: Path, tensors: Mapping[str, np.ndarray]) -> None:
        import onnxruntime as ort

        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(self.fingerprint)
        fmt.set_model_version(self.identity)
        # (kept alive: OrtValues borrow numpy memory)
        fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensors[name])) for name in sorted(tensors)})
        fmt.export_adapter(str(path))

    # -- device -----------------------------------------------------------------------------
    def read(self, path: Path, name: str) -> dict[str, np.ndarray]:
        """An .onnx_adapter file's tensors, checked against this base and layout."""
        fmt = self._open(path, name)
        # copied out while the file's reader lives: its parameters point into memory the reader owns
        arrays = {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
        del fmt
        return arrays

    def check_file(self, path: Path, name: str) -> None:
        """What :meth:`read` checks, without keeping the tensors."""
        self._open(path, name)  # (its reader and the file's memory go when it returns)

    def _open(self, path: Path, name: str):
        """The file's reader, once its base, layout and tensor shapes are this package's."""
        import onnxruntime as ort

        try:
            fmt = ort.AdapterFormat.read_adapter(str(path))
        except Exception as exc:  # ORT's own exception types
            raise PackageError(f"{path} is not a readable ONNX Runtime adapter ({str(exc).splitlines()[0]})") from None
        if fmt.get_model_version() != self.identity:
            raise PackageError(f"{path} (adapter {name!r}) was compiled for another base model (model_version {fmt.get_model_version()}, "
                               f"this package's base is {self.identity}); compile it against this base")  # fmt: skip
        layout = fmt.get_adapter_version()
        if layout not in (self.fingerprint, UNFINGERPRINTED):
            raise PackageError(f"{path} (adapter {name!r}) was compiled for another slot layout ({layout:08x}, this package's is "
                               f"{self.fingerprint:08x}); add it from its PEFT directory: lora-edge adapters add PKG {name}=DIR")  # fmt: skip
        self.check(path, name, {k: tuple(v.shape()) for k, v in fmt.get_parameters().items()})
        return fmt

    def check(self, where: Path | str, name: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every tensor is a LoRA input of the graph, of a shape that fits it, and each slot's ranks agree."""
        inputs = self.inputs
        ranks: dict[str, int] = {}
        for pname, shape in shapes.items():
            if pname == INVOCATION_TOKENS and self.alora and len(shape) == 1:
                continue
            if pname not in inputs:
                raise PackageError(f"{where} (adapter {name!r}) overrides {pname!r}, which is not a LoRA input of this graph; "
                                   "it belongs to another package")  # fmt: skip
            slot, want = inputs[pname]
            if len(shape) != len(want) or any(isinstance(w, int) and d != w for d, w in zip(shape, want)):
                raise PackageError(f"{where} (adapter {name!r}): {pname} has shape {tuple(shape)}, which does not fit this graph; "
                                   "it belongs to another package")  # fmt: skip
            for d, w in zip(shape, want):
                if isinstance(w, str) and w != "bytes":  # the slot's rank, or the rank per module of a chunked B ("r/N")
                    r = d * (int(w[2:]) if w.startswith("r/") else 1)
                    if ranks.setdefault(slot, r) != r:
                        raise PackageError(f"{where} (adapter {name!r}): {slot} has lora_A and lora_B of different ranks")
