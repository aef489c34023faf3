"""lora-edge: compile a base model + PEFT LoRA adapters into an ONNX package and run it on device.

``import lora_edge`` is device-side only: onnxruntime, numpy, tokenizers. The compile side
(:mod:`lora_edge.compile`: export, verify) imports torch, transformers and onnx.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AdapterError,
    InputError,
    LoraEdgeError,
    ModelError,
    PackageError,
    RuntimeInputError,
    UnsupportedFeatureError,
)


def load(path, **kwargs):
    """Load a package for inference: ``lora_edge.load("pkg/").generate("Hi", adapter="pirate")``."""
    from .runtime import load as _load

    return _load(path, **kwargs)


__all__ = [
    "AdapterError",
    "InputError",
    "LoraEdgeError",
    "ModelError",
    "PackageError",
    "RuntimeInputError",
    "UnsupportedFeatureError",
    "__version__",
    "load",
]
