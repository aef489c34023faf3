"""Load a base model (Hugging Face directory or single .gguf file) for export and for the oracle.

Compile side: imports torch and transformers (lazily, so `import lora_edge` stays light).
Never fetches anything: local_files_only everywhere, and the base must be on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import InputError, ModelError
from . import family_for
from .gguf_file import GGUFFile, gguf_config, gguf_tensor_names
from .spec import BaseModel

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def describe_base(path: Path) -> tuple[str, list[Path]]:
    """Classify ``path`` as 'gguf' or 'hf' and list its weight files; raise InputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"base model {path} does not exist; give a Hugging Face model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"base model {path} is a file but not a .gguf; give a .gguf file or a model directory")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{path} does not start with the GGUF magic bytes; the file is corrupt or not GGUF")
        return "gguf", [path]
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a model directory (no config.json); give a Hugging Face model directory or a .gguf file")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        raise InputError(f"{path} has no *.safetensors weights{hint}")
    return "hf", weights


def load_hf_model(path: Path, step: Callable[[int, int], None] = lambda done, total: None):
    """The PyTorch model, float32, eval mode: the exporter's source and the verifier's oracle.
    ``step(done, total)`` follows the tensors read from a GGUF file."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, _ = describe_base(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # lora-edge reports its own progress; no bars or warnings from below
    hf_logging.disable_progress_bar()
    try:
        if kind == "gguf":
            model = _gguf_model(GGUFFile(path), step)
        else:
            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
            arch = (cfg.architectures or ["?"])[0]
            family = family_for(arch)
            auto = getattr(transformers, family.auto_class(arch)) if hasattr(family, "auto_class") else AutoModelForCausalLM
            model = auto.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load base model {path}: {first}") from None
    return model.eval()


def _gguf_model(f: GGUFFile, step: Callable[[int, int], None]):
    """The model transformers' GGUF loading builds (same config, same dequantized and re-permuted weights),
    from one fast read of the file: its own reader parses the metadata per element, more than once per load."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    arch, config = gguf_config(f)
    config_obj = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config_obj)  # the parameter names, without allocating them
    names = list(meta.state_dict())
    to_hf = gguf_tensor_names(config["model_type"], config_obj.num_hidden_layers, names)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    state = {}
    for i, name in enumerate(f.tensors):
        result = processor.process(weights=f.read(name), name=name, tensor_key_mapping=to_hf, parsed_parameters={"tensors": state})
        if result.name in to_hf:
            state[to_hf[result.name]] = torch.from_numpy(np.require(result.weights, np.float32, ['C', 'W']))
        step(i + 1, len(f.tensors))
    model = type(meta).from_pretrained(None, config=config_obj, state_dict=state, dtype=torch.float32)
    model.config._name_or_path = str(f.path.parent)  # (as transformers records a GGUF's directory)
    return model


def load_base(path: Path, step: Callable[[int, int], None] = lambda done, total: None) -> tuple[BaseModel, object]:
    """Read the base into a torch-free BaseModel; also return the torch model for callers that need it.
    ``step(done, total)`` follows the tensors read from a GGUF file."""
    path = Path(path)
    kind, weight_files = describe_base(path)
    model = load_hf_model(path, step)
    family = family_for(type(model).__name__)
    spec, inv_freq = family.spec_from_hf(model)
    weights = family.internal_weights({k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()})
    if spec.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    source_blocks = None
    if kind == "gguf":
        from .gguf_tokenizer import tokenizer_files_from_gguf

        reader = GGUFFile(path)
        tokenizer_files, source_blocks = tokenizer_files_from_gguf(path, reader), reader.block_type()
    else:
        tokenizer_files = {n: (path / n).read_bytes() for n in _TOKENIZER_FILES if (path / n).is_file()}
    hf_config = json.loads(model.config.to_json_string(use_diff=False))
    hf_config.pop("quantization_config", None)  # the GGUF's own quantization; the weights are float now
    base = BaseModel(
        spec=spec,
        weights={k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()},
        rope_inv_freq=inv_freq,
        hf_config=hf_config,
        tokenizer_files=tokenizer_files,
        source=path.resolve(),
        source_blocks=source_blocks,
        sha256=_sha256_files(weight_files),
        linear_modules=family.linear_modules(spec),
        other_modules=family.other_modules(spec),
        replaceable=family.replaceable(spec) if hasattr(family, "replaceable") else frozenset(),
    )
    return base, model
