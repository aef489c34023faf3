"""A strict, torch-free safetensors reader.

Written here rather than taken from ``safetensors.numpy`` because (a) that cannot read
bfloat16, the usual dtype of adapters trained in mixed precision, and (b) a corrupt or
truncated file must become a one-line :class:`AdapterError`/:class:`ModelError` that names
the file, never a Rust panic or a numpy traceback. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import LoraEdgeError

# safetensors dtype -> (numpy dtype, bytes per element); BF16 is widened below.
_DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: Path, error: type[LoraEdgeError]) -> dict[str, np.ndarray]:
    """Read every tensor of ``path``; floats come back as float32. Raises ``error`` on any defect."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    what = f"{path} is not a valid safetensors file"
    if len(blob) < 8:
        raise error(f"{what} (only {len(blob)} bytes); re-save the file with safetensors")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(_MAX_HEADER, len(blob) - 8):
        raise error(f"{what} (header length {n} exceeds the file size {len(blob)}); the file is truncated or corrupt")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error(f"{what} (its JSON header does not parse); the file is corrupt") from None
    if not isinstance(header, dict):
        raise error(f"{what} (its header is not a JSON object); the file is corrupt")
    data = memoryview(blob)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise error(f"{what} (entry {name!r} is not an object)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise error(f"{what} (tensor {name!r} has unsupported dtype {dtype!r})")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise error(f"{what} (tensor {name!r} has a malformed shape or data_offsets)")
        np_dtype, size = _DTYPES[dtype]
        begin, end = offsets
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end <= len(data) or end - begin != count * size:
            raise error(
                f"{what} (tensor {name!r} needs bytes {begin}..{end} of a {len(data)}-byte data section); "
                "the file is truncated or corrupt"
            )
        arr = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(shape)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        out[name] = np.array(arr)  # own the memory; the blob can go
    return out
