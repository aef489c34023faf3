"""The options a graph is written with: one frozen object, built once from the export's options and handed to a
family's ``build_graph``; the emitters (projection.py, branch.py, ...) are chosen from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ...config import ExportConfig, LoraDtype, LoraKernel, WeightType
from ...errors import UnsupportedFeatureError

COMPUTE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class GraphOptions:
    opset: int = 17
    # rank of the "no adapter" defaults of the branch inputs: 0 (empty: the branch computes nothing) or 1 (zeros)
    null_rank: int = 0
    store_fp16: bool = False  # float weights stored as float16 and cast up once at load (half the download)
    accuracy_level: int = 4  # MatMulNBits': 4 = int8 activations, 0/1 = float32 compute
    fused: bool = True  # ONNX Runtime's fused operators (GroupQueryAttention, ...); otherwise standard ONNX only
    # activations, KV cache and LoRA tensors; the logits are returned as float32 either way
    compute_dtype: str = "float32"
    lora_kernel: LoraKernel = LoraKernel.ONNX
    lora_dtype: LoraDtype = LoraDtype.FLOAT16  # how the native kernel's branches store A and B
    alora: bool = False  # every branch's delta times a per-position mask (ALORA_MASK)
    row_mask: bool = False  # every branch's x @ A times a per-row mask over the rank (ROW_MASK): mixed-adapter batches

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_kernel", LoraKernel.parse(self.lora_kernel, "LoRA kernel"))
        object.__setattr__(self, "lora_dtype", LoraDtype.parse(self.lora_dtype, "LoRA dtype"))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be float32 or float16, got {self.compute_dtype}")
        if self.compute_dtype == "float16" and not self.fused:  # the reference graph's mask and rotary are float32
            raise UnsupportedFeatureError("float16 compute needs the fused graph (--attention fused)")
        if self.native and self.compute_dtype != "float32":
            raise ValueError("the native LoRA kernel computes in float32; it is for the cpu target")

    @classmethod
    def from_config(cls, cfg: ExportConfig) -> GraphOptions:
        return cls(opset=cfg.opset, null_rank=cfg.null_rank, store_fp16=cfg.quant.weights is WeightType.FP16,
                   accuracy_level=cfg.quant.accuracy_level, fused=cfg.fused, compute_dtype=cfg.compute_dtype,
                   lora_kernel=cfg.lora_kernel, lora_dtype=cfg.lora_dtype, alora=cfg.alora,
                   row_mask=bool(cfg.mixed_batches))  # fmt: skip

    @property
    def native(self) -> bool:
        return self.lora_kernel is LoraKernel.NATIVE

    @property
    def ct(self) -> type:
        """The compute dtype as a numpy scalar type (np.float32 or np.float16)."""
        return np.dtype(self.compute_dtype).type

    @property
    def onnx_ct(self) -> int:
        """The compute dtype as an ONNX element type (Cast's ``to``)."""
        return TensorProto.FLOAT16 if self.compute_dtype == "float16" else TensorProto.FLOAT
