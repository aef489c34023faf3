"""Device side: register the native kernel with an ONNX Runtime session, or say how to build it."""

from __future__ import annotations

from pathlib import Path

from ..errors import KernelError
from .build import find_library, library_version
from .contract import MIN_ORT

def register(session_options, package: Path, need: int = 1) -> Path:
    """Register the kernel with ONNX Runtime session options, or say how to build it. ``need``: the
    kernel version the package records (a kernel built from an older lora-edge may be older)."""
    import onnxruntime as ort

    have = tuple(int(v) for v in ort.__version__.split(".")[:2] if v.isdigit())
    if have < MIN_ORT:
        raise KernelError(f"{package} runs on lora-edge's native kernel (its LoRA branches, or int4 offsets), which needs onnxruntime >= "
                          f"{'.'.join(map(str, MIN_ORT))} (this is {ort.__version__}); upgrade onnxruntime, or re-export "
                          "with --lora-kernel onnx")  # fmt: skip
    lib = find_library()
    if lib is None:
        raise KernelError(f"{package} runs on lora-edge's native kernel (its LoRA branches, or int4 offsets), which is not built on this machine; "
                          "run `lora-edge build-kernel` (needs a C++ compiler), or re-export with --lora-kernel onnx")  # fmt: skip
    have_version = library_version(lib)
    if have_version is not None and have_version < need:
        raise KernelError(f"{package} needs lora-edge's native kernel v{need}, and {lib} is v{have_version}; rebuild it "
                          "with `lora-edge build-kernel --force` (or point LORA_EDGE_KERNEL_LIB at a newer build)")  # fmt: skip
    try:
        session_options.register_custom_ops_library(str(lib))
    except Exception as exc:  # ORT raises its own types
        raise KernelError(f"onnxruntime cannot load the native kernel {lib}: {str(exc).splitlines()[0]}; "
                          "rebuild it with `lora-edge build-kernel --force`") from None  # fmt: skip
    return lib
