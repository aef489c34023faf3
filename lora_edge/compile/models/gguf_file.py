"""A GGUF file read once, fast: its metadata as Python values, its tensors dequantized to float32 with numpy.

The ``gguf`` package's reader builds a numpy view per element of every metadata array (the tokenizer's
~100k strings), and transformers reads the file that way two or three times per load; here the
metadata is parsed with ``struct`` in one pass and the tensor data is mapped, not read.
Dequantization is the ``gguf`` package's own (vectorized numpy), so the values are the ones
transformers loads.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ModelError

# GGUF metadata value types -> struct format (8: string, 9: array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}  # ggml type -> dtype


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    ggml_type: int
    offset: int  # from the start of the file


class GGUFFile:
    """``fields``: metadata key -> int, float, bool, str or list of those; ``tensors``: name -> TensorInfo."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.fields, self.tensors = _parse(self._map)
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise ModelError(f"{self.path} is not a readable GGUF file ({exc}); the file is truncated or corrupt") from None

    def block_type(self) -> str | None:
        """The GGML type most of the 2-D weights are stored in ("Q4_0", "Q4_1", "F16", ...), or None without any."""
        from collections import Counter

        from gguf import GGMLQuantizationType

        types = Counter(t.ggml_type for t in self.tensors.values() if len(t.dims) == 2)
        return GGMLQuantizationType(types.most_common(1)[0][0]).name if types else None

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in numpy's order (the reverse of GGUF's dims)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

        info = self.tensors[name]
        shape = tuple(reversed(info.dims))
        n = int(np.prod(shape))
        if info.ggml_type in _PLAIN:
            data = np.frombuffer(self._map, _PLAIN[info.ggml_type], n, info.offset).reshape(shape)
        else:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
            data = np.frombuffer(self._map, np.uint8, n // block * size, info.offset)
            data = data.reshape(shape[:-1] + (shape[-1] // block * size,))
        return dequantize(data, GGMLQuantizationType(info.ggml_type))


def _parse(buf) -> tuple[dict, dict[str, TensorInfo]]:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = bytes(buf[pos : pos + n]).decode("utf-8")
        pos += n
        return s

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, count = take("I"), take("Q")
            if itype in _SCALARS and itype != 7:  # a numeric array in one read
                fmt = _SCALARS[itype]
                vals = list(struct.unpack_from(f"<{count}{fmt}", buf, pos))
                pos += count * struct.calcsize(fmt)
                return vals
            return [value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ModelError(f"unknown GGUF metadata type {vtype}")
        return take(_SCALARS[vtype])

    if bytes(buf[:4]) != b"GGUF":
        raise ModelError("not a GGUF file (no GGUF magic bytes)")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version < 2:
        raise ModelError(f"GGUF version {version} is too old; convert the model with a recent llama.cpp")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, dims, take("I"), take("Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-pos // align) * align
    return fields, {name: TensorInfo(name, dims, t, start + off) for name, dims, t, off in infos}


# GGUF architecture names that transformers knows under another model type
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_config(f: GGUFFile) -> tuple[str, dict]:
    """(the GGUF architecture, the config dict) as transformers' GGUF loading derives them from the metadata."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_SUPPORTED_ARCHITECTURES, GGUF_TO_TRANSFORMERS_MAPPING

    arch = f.get("general.architecture")
    updated = "mistral" if "llama" in arch and f.get("general.name") == "mistral" else _MODEL_TYPES.get(arch, arch)
    if updated not in GGUF_SUPPORTED_ARCHITECTURES and arch not in GGUF_SUPPORTED_ARCHITECTURES or arch.startswith(("t5", "stablelm", "lfm2")):
        raise ModelError(f"{f.path}: GGUF architecture {arch!r} is not supported; export from a Hugging Face model directory")
    config: dict = {"tie_word_embeddings": "output.weight" not in f.tensors or arch in ("falcon", "bloom")}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        config.setdefault(key, value)
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for key, value in f.fields.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        target = renames.get(prefix, {}).get(rest)
        if target is not None and target != -1:
            config[target] = value
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in f.fields:
        config["vocab_size"] = len(f.fields["tokenizer.ggml.tokens"])
    return arch, config


def gguf_tensor_names(model_type: str, num_layers: int, hf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name (llama.cpp's standard names, through the ``gguf`` package's map)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    gguf_type = {"gemma3_text": "gemma3", **{v: k for k, v in _MODEL_TYPES.items()}}.get(model_type, model_type)
    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == gguf_type), None)
    if arch is None:
        raise ModelError(f"the gguf package does not know the architecture {model_type!r}; upgrade it (pip install -U gguf)")
    name_map = get_tensor_name_map(arch, num_layers)
    out = {}
    for hf in hf_names:
        stem, dot, suffix = hf.rpartition(".") if hf.endswith((".weight", ".bias")) else (hf, "", "")
        g = name_map.get_name(stem)
        if g is not None:
            out[g + dot + suffix] = hf
    return out
