"""Where a package will run: what the export adds or changes per target, and files for other front ends.

- ``cpu``: the graph as built (float32 compute, int4/int8 weights through MatMulNBits).
- ``mobile``: the same graph converted to ONNX Runtime's ORT format (``model.ort``, one flatbuffer,
  no external data), optimized ahead of time the way ``onnxruntime.tools.convert_onnx_models_to_ort``
  does it ("Fixed" style), plus ``required_operators_and_types.config`` for a reduced-size ORT build
  (``build.sh --minimal_build extended --include_ops_by_config ...``). The LoRA inputs stay overridable
  initializers in the .ort, so adapters switch exactly as on the .onnx.
- ``cuda``: float16 compute (weights int4/int8/fp16, LoRA tensors fp16), the rank-1 zero "no adapter"
  defaults (empty rank-0 tensors are reported to fail on CUDA), and ``provider_options`` for CUDA in
  the genai_config.json.

Every package also gets ``genai_config.json`` so that ONNX Runtime GenAI (``onnxruntime_genai``) can
load it directly and use its ``.onnx_adapter`` files through ``og.Adapters``.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

from ..errors import InputError, PackageError

MOBILE_OPS_CONFIG = "required_operators_and_types.config"


class Target(str, enum.Enum):
    CPU = "cpu"
    MOBILE = "mobile"
    CUDA = "cuda"


def providers_for(target: str) -> list[str]:
    """Execution providers to ask for, in order, for a package built for ``target``."""
    return {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(target, ["CPUExecutionProvider"])


def genai_config(spec: dict, hf_config: dict, generation_config: dict, graph_file: str, target: str) -> dict:
    """The genai_config.json of a lora-edge package (onnxruntime-genai >= 0.5; checked with 0.18).

    Every name below is already ONNX Runtime GenAI's default; they are written out so the file says
    what the graph is. ``past_present_share_buffer``: our GroupQueryAttention writes the new keys and
    values into the same buffer (as lora-edge's own runtime binds it)."""
    def first(*vals):
        for v in vals:
            if v is not None:
                return v[0] if isinstance(v, list) and v else v
        return None

    eos = first(generation_config.get("eos_token_id"), hf_config.get("eos_token_id"))
    bos = first(generation_config.get("bos_token_id"), hf_config.get("bos_token_id"))
    pad = first(generation_config.get("pad_token_id"), hf_config.get("pad_token_id"), eos)
    model_type = hf_config.get("model_type") or spec["family"]
    provider_options = [{"cuda": {}}] if target == Target.CUDA.value else []
    return {
        "model": {
            "type": model_type,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "context_length": spec["max_position_embeddings"],
            "vocab_size": spec["vocab_size"],
            "decoder": {
                "filename": graph_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "head_size": spec["head_dim"],
                "hidden_size": spec["hidden_size"],
                "num_attention_heads": spec["num_heads"],
                "num_hidden_layers": spec["num_layers"],
                "num_key_value_heads": spec["num_kv_heads"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": spec["max_position_embeddings"],
            "min_length": 0,
            "past_present_share_buffer": True,
            "num_return_sequences": 1,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "early_stopping": True,
        },
    }


def write_genai_config(out: Path, spec: dict, hf_config: dict, graph_file: str, target: str) -> None:
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    (out / "genai_config.json").write_text(json.dumps(genai_config(spec, hf_config, gen, graph_file, target), indent=2) + "\n")


def to_ort_format(onnx_path: Path, ort_path: Path) -> Path:
    """Convert to ORT format in-process, as ``convert_onnx_models_to_ort --optimization_style Fixed
    --target_platform arm`` does: an optimizing session that saves its graph as .ort. Then write the
    operator config for a reduced build next to it. Returns the config's path.

    The LoRA inputs are overridable initializers, which the optimizer never folds, so adapters stay
    switchable. (The fp16 block offsets of int4 weights are folded to float32 here, which makes the
    .ort about 9% larger than model.onnx.data.)"""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(ort_path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1")  # as for --target_platform arm
    try:
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])  # x86-only layouts
    except Exception as exc:  # ORT's own exception types
        raise PackageError(f"onnxruntime could not convert {onnx_path.name} to ORT format: {str(exc).splitlines()[0]}") from None
    if ort_path.stat().st_size >= 2**31:
        raise InputError(f"{ort_path.name} is {ort_path.stat().st_size / 2**30:.1f} GiB; the ORT format holds at most 2 GiB: "
                         "quantize (--quant int4) for the mobile target")  # fmt: skip
    import logging

    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    config = ort_path.parent / MOBILE_OPS_CONFIG
    create_config_from_models([ort_path], config, True)
    return config
