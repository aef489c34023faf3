"""Adapter files on the device: what each LoRA input of a package's graph must look like, and reading an
.onnx_adapter file checked against it (the base it was compiled for, its tensor names and shapes)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import PackageError
from ..native.contract import W8A8_BLOB
from ..package.manifest import SlotInfo

# An expected shape: an int is a fixed size, "r" the slot's rank, "r/N" the rank per module of a chunked B
# (N modules), "bytes" a blob's length.
Shape = tuple[int | str, ...]


def slot_shapes(slots: tuple[SlotInfo, ...]) -> dict[str, tuple[str, Shape]]:
    """Every overridable input of the package's ``slots``: name -> (slot, expected shape)."""
    out: dict[str, tuple[str, Shape]] = {}
    for s in slots:
        n, o = s.name, s.out_features
        out[s.lora_A] = (n, (s.in_features, "r"))
        chunks = s.lora_B_chunks
        out[s.lora_B] = (n, (len(chunks.modules), f"r/{len(s.parts)}", chunks.width) if chunks else ("r", o))
        if s.lora_blob is not None:  # w8a8: its A, B and scales are its part of the one blob
            del out[s.lora_A], out[s.lora_B]
            out[W8A8_BLOB] = ("w8a8 blob", ("bytes",))
        elif s.lora_A_scale:  # int8 A/B (native kernel): one scale per column of A, per row of B
            out[s.lora_A_scale] = (n, ("r",))
            out[s.lora_B_scale] = (n, out[s.lora_B][1][:-1])
        if s.weight:  # a module adapters may replace (modules_to_save): (in, out) and its bias
            out[s.weight] = (n, (s.in_features, o))
            out[s.bias_in] = (n, (o,))
        for name in (s.lora_M, s.lora_bias):  # per-output-channel vectors (DoRA scale, trained bias change)
            if name:
                out[name] = (n, (o,))
    return out


def ranked_shapes(slot: SlotInfo, rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of a slot's lora_A and lora_B for an adapter of ``rank`` on each of its modules."""
    chunks = slot.lora_B_chunks
    if chunks:
        n = len(slot.parts)
        return {slot.lora_A: (slot.in_features, n * rank), slot.lora_B: (len(chunks.modules), rank, chunks.width)}
    return {slot.lora_A: (slot.in_features, rank), slot.lora_B: (rank, slot.out_features)}


def load_adapter_file(path: Path, name: str, identity: int, slot_inputs: dict[str, tuple[str, Shape]]) -> dict[str, ort.OrtValue]:
    """Read an .onnx_adapter file; check it belongs to this base (``identity``) and this graph (``slot_inputs``)."""
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ORT's own exception types
        raise PackageError(f"{path} is not a readable ONNX Runtime adapter ({str(exc).splitlines()[0]})") from None
    if fmt.get_model_version() != identity:
        raise PackageError(f"{path} (adapter {name!r}) was compiled for another base model (model_version {fmt.get_model_version()}, "
                           f"this package's base is {identity}); re-export it against this base")  # fmt: skip
    params = fmt.get_parameters()
    check_adapter_tensors(path, name, {k: tuple(v.shape()) for k, v in params.items()}, slot_inputs)
    return dict(params)


def check_adapter_tensors(where: Path | str, name: str, shapes: dict[str, tuple[int, ...]], slot_inputs: dict) -> None:
    """Every tensor is a LoRA input of the graph, of a shape that fits it, and each slot's ranks agree."""
    ranks: dict[str, int] = {}
    for pname, shape in shapes.items():
        if pname not in slot_inputs:
            raise PackageError(f"{where} (adapter {name!r}) overrides {pname!r}, which is not a LoRA input of this graph; it belongs to another package")
        slot, want = slot_inputs[pname]
        if len(shape) != len(want) or any(isinstance(w, int) and d != w for d, w in zip(shape, want)):
            raise PackageError(f"{where} (adapter {name!r}): {pname} has shape {shape}, which does not fit this graph; it belongs to another package")
        for d, w in zip(shape, want):
            if isinstance(w, str) and w != "bytes":  # the slot's rank, or the rank per module of a chunked B ("r/N")
                r = d * (int(w[2:]) if w.startswith("r/") else 1)
                if ranks.setdefault(slot, r) != r:
                    raise PackageError(f"{where} (adapter {name!r}): {slot} has lora_A and lora_B of different ranks")
