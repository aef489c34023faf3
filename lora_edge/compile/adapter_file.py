"""Write an adapter as ONNX Runtime's .onnx_adapter file, its tensors named after the graph inputs they override."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import LoraDtype
from ..native.encode import encode
from ..package.manifest import EMBEDDING
from .models import Slot
from .peft import Adapter
from .slots import adapter_tensors, balanced


def write_adapter_file(path: Path, adapter: Adapter, slots: dict[str, Slot], model_version: int, dtype=np.float32,
                       lora_dtype: LoraDtype | None = None, blob: tuple = ()) -> None:  # fmt: skip
    """``dtype``: of every tensor; ``lora_dtype``: how the native kernel stores lora_A / lora_B ("float16",
    "int8" with scales, "w8a8" the same in the q8x order, the ``blob``'s (lora_A, lora_B, chunks, c) in one
    tensor; see lora_edge.native.encode), None for ``dtype`` like the rest."""
    import onnxruntime as ort

    tensors = adapter_tensors(balanced(adapter) if lora_dtype else adapter, slots)
    pairs = [(s.a_name, s.b_name) for s in slots.values() if s.name != EMBEDDING]  # (embedding LoRA stays in dtype)
    ab = {n for pair in pairs for n in pair}
    tensors = {name: t if lora_dtype and name in ab else t.astype(dtype) for name, t in tensors.items()}
    if lora_dtype:
        tensors = encode(tensors, pairs, lora_dtype, blob)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(model_version)
    # (kept alive: OrtValues borrow numpy memory)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(tensors[name]) for name in sorted(tensors)})
    fmt.export_adapter(str(path))
