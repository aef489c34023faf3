"""Export: base + adapters -> package (compile side), as a list of stages that reads top to bottom in :func:`export`.

Only the base weights go into model.onnx; each adapter goes into its own ``adapters/NAME.onnx_adapter`` whose
tensors are named after the graph inputs they override (``<module>.lora_A`` / ``<module>.lora_B``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..adapters.peft import Adapter, check_adapter_files, read_adapter
from ..adapters.storage import Storage
from ..config import ExportConfig, Mode, QuantAlgo, Target, WeightType
from ..errors import InputError
from ..package.manifest import Manifest
from ..package.store import check_output, staged_output, write_manifest
from .graph.blob import blob_geometry, blob_slots
from .graph.options import GraphOptions
from .manifest_writer import build_manifest, quantization_record, slot_info
from .merge import merged_weights
from .models import Slot, family_for
from .models.spec import BaseModel
from .progress import Progress, counting
from .quant.blocks import quantize_weights
from .slots import plan_slots
from .targets import to_ort_format, write_genai_config


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest


def export(cfg: ExportConfig, progress: Progress = lambda msg: None) -> ExportResult:
    """Compile ``cfg.base`` and ``cfg.adapters`` into a package at ``cfg.output``. ``progress`` is told each
    stage; a :class:`.progress.Reporter` also draws bars for the counted ones."""
    check_inputs(cfg)  # before the slow part: everything that can be checked without loading the model
    progress(f"loading base model {cfg.base}")
    base, hf_model = _load_base(cfg, progress)
    adapters = read_adapters(cfg, base, progress)
    if any(a.invocation_tokens for a in adapters) and not cfg.alora:
        cfg = dataclasses.replace(cfg, alora=True)  # an activated adapter needs the mask input
    if base.spec.is_encoder and cfg.mixed_batches:  # (an encoder's call takes one adapter; its head's x is 2-D)
        cfg = dataclasses.replace(cfg, mixed_batches=False)
    family = family_for(base.spec.architecture)
    slots = plan_slots(base, adapters, family, cfg.fused) if cfg.mode is Mode.BRANCH else {}
    weights = base_weights(cfg, base, adapters, slots)
    weights, quantization = quantize(cfg, base, hf_model, weights, slots, progress)
    progress(f"building graph: {base.spec.num_layers} layers, {len(slots)} LoRA branches")
    model = family.build_graph(base, weights, slots, GraphOptions.from_config(cfg))
    with staged_output(cfg.output, cfg.force) as tmp:
        graph_file = write_graph(cfg, model, tmp, progress)
        blob = blob_layout(cfg, slots)
        slot_infos = tuple(slot_info(cfg, s, adapters, blob) for s in slots.values())
        storage = Storage(base.identity, slot_infos, cfg.compute_dtype, cfg.lora_dtype if cfg.native else None, blob, cfg.alora)
        write_adapters(cfg, adapters, storage, tmp, progress)
        write_side_files(cfg, base, graph_file, tmp)
        progress("writing manifest.json")
        manifest = build_manifest(cfg, base, adapters, slot_infos, model, quantization, graph_file, blob)
        manifest = write_manifest(tmp, manifest)
    return ExportResult(path=Path(cfg.output), manifest=manifest)


def check_inputs(cfg: ExportConfig) -> None:
    from .models.loader import describe_base

    check_output(cfg.output, cfg.force)
    describe_base(cfg.base)
    for spec in cfg.adapters:
        check_adapter_files(spec.name, spec.path)


def _load_base(cfg: ExportConfig, progress: Progress):
    from .models.loader import load_base

    with counting(progress, "tensors read") as step:
        return load_base(cfg.base, step)


def read_adapters(cfg: ExportConfig, base: BaseModel, progress: Progress) -> list[Adapter]:
    adapters = []
    for spec in cfg.adapters:
        progress(f"reading adapter {spec.name} from {spec.path}")
        adapters.append(read_adapter(spec.name, spec.path, base))
    return adapters


def base_weights(cfg: ExportConfig, base: BaseModel, adapters: list[Adapter], slots: dict[str, Slot]) -> dict:
    """The float weights the graph is built from: the base's, or merged with the adapter (in fp32, then quantized)."""
    weights = merged_weights(base, adapters[0]) if cfg.mode is Mode.MERGE else base.weights
    replaced = replaced_weights(base, slots)
    return {**weights, **replaced} if replaced else weights  # a replaceable module's weight is an input, base as default


def replaced_weights(base: BaseModel, slots: dict[str, Slot]) -> dict:
    return {f"{s.name}.weight": base.weight_of(s.name) for s in slots.values() if s.replace}


def quantize(cfg: ExportConfig, base: BaseModel, hf_model, weights: dict, slots: dict[str, Slot], progress: Progress):
    """The weights as the recipe stores them, and the manifest's record of it."""
    q = cfg.quant
    _note_q4_0_source(cfg, base, progress)
    if q.weights is WeightType.FP32 and q.embedding_type is WeightType.FP32:
        return weights, quantization_record(q, {"fp32": len(base.linear_modules) + 1}, None, True)
    hessians = calibrate(base, hf_model, q, progress) if q.algo is QuantAlgo.GPTQ and q.weights is WeightType.INT4 else None
    with counting(progress, "layers quantized") as step:
        weights, counts, sizes = quantize_weights(weights, base.linear_modules, q, progress, hessians, step, q8_tables(cfg))
    weights.update(replaced_weights(base, slots))  # a module adapters may replace stays float: its weight is an input
    return weights, quantization_record(q, counts, sizes, "model.embed_tokens.weight" in base.weights)


def _note_q4_0_source(cfg: ExportConfig, base: BaseModel, progress: Progress) -> None:
    """A Q4_0 GGUF base quantized to int4 with float offsets: its blocks are re-fitted at 5 bits per weight, where
    --zero none would keep them exactly at 4.5 (say so; the recipe stays what was asked for)."""
    q = cfg.quant
    if q.weights is WeightType.INT4 and q.zero is None and base.source_blocks == "Q4_0":
        progress("note: the base's blocks are Q4_0; --zero none keeps them exactly, in 4.5 bits per weight "
                 "(the default re-fits them with float offsets, 5 bits)")


def q8_tables(cfg: ExportConfig) -> bool:
    """Whether the int8 head (and the embedding it shares) is a Q8_0 table for the native kernel's MatMulQ8: in int4
    recipes at accuracy level 4, where MatMulNBits would prepack a second copy of it (MatMulQ8 quantizes activations
    per block as MatMulNBits does there)."""
    q = cfg.quant
    return cfg.native and q.weights is WeightType.INT4 and q.accuracy_level == 4


def calibrate(base: BaseModel, hf_model, q, progress: Progress) -> dict | None:
    """GPTQ's input statistics from the float model on the calibration text."""
    from tokenizers import Tokenizer

    from .quant.calibrate import collect_hessians, default_calibration_text

    if "tokenizer.json" not in base.tokenizer_files:
        if q.calibration is not None:
            raise InputError("GPTQ needs the base's tokenizer.json to read the calibration text; use --quant-algo search")
        progress("no tokenizer.json: GPTQ falls back to the data-free 'search' algorithm")
        return None
    text = q.calibration.read_text(encoding="utf-8") if q.calibration else default_calibration_text()
    ids = Tokenizer.from_str(base.tokenizer_files["tokenizer.json"].decode()).encode(text, add_special_tokens=False).ids
    progress(f"calibrating GPTQ on {len(ids)} tokens")
    by_peft = {lm.peft: lm.path for lm in base.linear_modules.values()}  # hooks go on the PyTorch model's modules
    chunk = min(512, base.spec.max_position_embeddings)
    with counting(progress, "calibration tokens") as step:
        hessians = collect_hessians(hf_model, ids, list(by_peft), chunk=chunk, step=step)
    return {by_peft[m]: h for m, h in hessians.items()}


def write_graph(cfg: ExportConfig, model, tmp: Path, progress: Progress) -> str:
    """model.onnx (+ its external data), or model.ort for the mobile target; returns the graph's file name."""
    import onnx

    if not cfg.fused:  # the checker does not know ONNX Runtime's contrib ops registered in the default domain
        onnx.checker.check_model(model, full_check=False)
    progress("writing model.onnx")
    onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)  # fmt: skip
    if cfg.target is not Target.MOBILE:
        return "model.onnx"
    progress("converting to ORT format (model.ort) and writing the operator config for a reduced build")
    to_ort_format(tmp / "model.onnx", tmp / "model.ort")
    (tmp / "model.onnx").unlink()
    (tmp / "model.onnx.data").unlink(missing_ok=True)
    return "model.ort"


def blob_layout(cfg: ExportConfig, slots: dict[str, Slot]) -> tuple[tuple[str, str, int, int], ...]:
    """w8a8: the q8x branches' (lora_A, lora_B, chunks, c), in the order of their parts of the blob."""
    return tuple((s.a_name, s.b_name, *blob_geometry(s)) for s in blob_slots(slots, cfg.lora_kernel, cfg.lora_dtype))


def write_adapters(cfg: ExportConfig, adapters: list[Adapter], storage: Storage, tmp: Path, progress: Progress) -> None:
    if cfg.mode is not Mode.BRANCH or not adapters:
        return
    (tmp / "adapters").mkdir()
    for a in adapters:
        progress(f"writing adapters/{a.name}.onnx_adapter")
        storage.write(tmp / "adapters" / f"{a.name}.onnx_adapter", storage.tensors(a))


def write_side_files(cfg: ExportConfig, base: BaseModel, graph_file: str, tmp: Path) -> None:
    """The tokenizer, config.json, and ONNX Runtime GenAI's genai_config.json where GenAI can run the graph."""
    from dataclasses import asdict

    for fname, data in sorted(base.tokenizer_files.items()):
        (tmp / fname).write_bytes(data)
    (tmp / "config.json").write_text(json.dumps(base.hf_config, indent=2, sort_keys=True) + "\n")
    if cfg.fused and not base.spec.is_encoder and not cfg.native:  # (GenAI cannot load lora_edge's operators)
        write_genai_config(tmp, asdict(base.spec), base.hf_config, graph_file, cfg.target)
