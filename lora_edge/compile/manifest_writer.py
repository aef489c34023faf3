"""The manifest of a package being written: every field from what the stages produced (typed: lora_edge.package.manifest)."""

from __future__ import annotations

from .. import __version__
from ..config import ExportConfig, LoraDtype, Mode, QuantAlgo, QuantConfig, WeightType
from ..native.contract import W8A8_BLOB, version_for
from ..package.manifest import (ALORA_MASK, EMBEDDING, LOGITS_TO_KEEP, ROW_MASK, AdapterInfo, BaseInfo, BlobLayout, Chunks, GraphInfo, KernelInfo,
                                Manifest, Quantization, SlotInfo, SlotPart, TensorIO)  # fmt: skip
from ..recipes import recipe_of
from .graph.builder import kernel_features
from .models import Slot
from .models.spec import BaseModel
from ..adapters.peft import Adapter


def quantization_record(q: QuantConfig, tensors: dict[str, int], sizes: dict[str, int] | None, quantized_embeddings: bool) -> Quantization:
    return Quantization(
        weights=q.weights,
        block_size=q.block,
        zero=q.zero_for(q.weights).value if q.weights.bits else None,
        algo=q.algo.value,
        calibration=None if q.algo is not QuantAlgo.GPTQ else (str(q.calibration) if q.calibration else "built-in"),
        embeddings=q.embedding_type if quantized_embeddings else WeightType.FP32,
        int8_modules=q.int8_modules,
        float_modules=q.float_modules,
        accuracy_level=q.accuracy_level,
        tensors=tensors,
        bytes=sizes,
    )


def build_manifest(cfg: ExportConfig, base: BaseModel, adapters: list[Adapter], slots: tuple[SlotInfo, ...], model,
                   quantization: Quantization, graph_file: str, blob: tuple) -> Manifest:  # fmt: skip
    return Manifest(
        lora_edge_version=__version__,
        recipe=recipe_of(cfg),
        base=BaseInfo(source=str(base.source), sha256=base.sha256, identity=base.identity, spec=base.spec),
        mode=cfg.mode,
        quantization=quantization,
        graph=graph_info(cfg, model, graph_file, blob),
        slots=slots,
        adapters={a.name: adapter_info(cfg, a) for a in adapters},
        tokenizer={"files": tuple(sorted(base.tokenizer_files))},
        modules=tuple(base.linear_modules.values()),
        replaceable=tuple(sorted(base.replaceable)),
    )


def graph_info(cfg: ExportConfig, model, graph_file: str, blob: tuple) -> GraphInfo:
    def dims(vi):
        return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)

    initializers = {i.name for i in model.graph.initializer}
    kernel = None
    if cfg.native:
        features = kernel_features(model)
        kernel = KernelInfo(version=version_for(features), dtype=cfg.lora_dtype, features=tuple(f.value for f in features),
                            blob=BlobLayout(W8A8_BLOB, blob) if blob else None)  # fmt: skip
    return GraphInfo(
        file=graph_file,
        target=cfg.target,
        opset=cfg.opset,
        compute_dtype=cfg.compute_dtype,
        attention=cfg.attention,
        null_rank=cfg.null_rank,
        lora_kernel=kernel,
        alora_mask=ALORA_MASK if cfg.alora else None,
        row_mask=ROW_MASK if cfg.mixed_batches else None,
        logits_to_keep=LOGITS_TO_KEEP if LOGITS_TO_KEEP in initializers else None,
        inputs=tuple(TensorIO(i.name, dims(i)) for i in model.graph.input if i.name not in initializers),
        outputs=tuple(TensorIO(o.name, dims(o)) for o in model.graph.output),
    )


def slot_info(cfg: ExportConfig, s: Slot, adapters: list[Adapter], blob: tuple) -> SlotInfo:
    in_blob = [a for a, *_ in blob]
    int8_scales = cfg.native and cfg.lora_dtype is not LoraDtype.FLOAT16 and s.name != EMBEDDING and s.a_name not in in_blob
    a_scale, b_scale = s.scale_names if int8_scales else (None, None)
    return SlotInfo(
        name=s.name,
        in_features=s.in_features,
        out_features=s.out_features,
        parts=tuple(SlotPart(m, o) for m, o in s.parts),
        lora_A=s.a_name,
        lora_B=s.b_name,
        lora_A_scale=a_scale,
        lora_B_scale=b_scale,
        lora_B_chunks=Chunks(s.chunk_width, s.chunk_modules) if s.chunk_width else None,
        lora_blob=in_blob.index(s.a_name) if s.a_name in in_blob else None,
        lora_M=s.m_name if s.dora else None,
        lora_bias=s.bias_name if s.bias else None,
        weight=s.weight_name if s.replace else None,
        bias_in=s.replaced_bias_name if s.replace else None,
        adapters=tuple(a.name for a in adapters if set(s.modules) & set(a.modules)),
    )


def adapter_info(cfg: ExportConfig, a: Adapter) -> AdapterInfo:
    branch = cfg.mode is Mode.BRANCH
    return AdapterInfo(**a.summary(), file=f"adapters/{a.name}.onnx_adapter" if branch else None, merged=not branch)
