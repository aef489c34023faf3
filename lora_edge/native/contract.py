"""What the compile side writes and the native kernel reads: operator names, features and the version
that brings each, input names and the w8a8 blob's layout. One definition, imported by both sides and
mirrored by the C++ sources (src/); it imports nothing but numpy."""

from __future__ import annotations

import enum
from typing import Iterable

DOMAIN = "lora_edge"  # the ONNX domain of the kernel's operators
KERNEL_VERSION = 6  # the newest contract this lora-edge's kernel implements
MIN_ORT = (1, 21)  # the ONNX Runtime C API the kernel is built against (ABI-stable: later runtimes load it)


class _Name(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class Op(_Name):
    LORA_DELTA = "LoraDelta"  # x @ A @ B (float16 A/B) added onto optional base/extra addends
    LORA_DELTA_Q8 = "LoraDeltaQ8"  # the same with int8 A/B and float32 scales (2-D, or the q8x blob)
    BLOCK_OFFSET = "BlockOffset"  # int4's float-offset correction: blocksum(x) @ offsets, added onto an addend
    MATMUL_Q4 = "MatMulQ4"  # the int4 projection on the kernel's packed layout
    MATMUL_Q8 = "MatMulQ8"  # an int8 projection in Q8_0 blocks (the output head), read in MatMulNBits' 8-bit layout


class Feature(_Name):
    """A capability a graph uses; the graph writer records each one it emits (manifest: graph.lora_kernel.features)."""

    LORA_DELTA = "lora_delta"  # float16 branches, with base/extra addends
    LORA_DELTA_Q8 = "lora_delta_q8"  # int8 A/B with per-rank scales
    BLOCK_OFFSET = "block_offset"  # the float-offset correction: a BlockOffset node or a branch's `offsets` input
    MATMUL_Q4 = "matmul_q4"  # MatMulQ4, or a branch node taking the packed int4 weight (computing the projection)
    W8A8 = "w8a8"  # LoraDeltaQ8 in the q8x order, reading its part of the w8a8 blob, int8 activations
    MATMUL_Q8 = "matmul_q8"  # MatMulQ8: the output head on the embedding's own Q8_0 table


# The kernel version that first implements each feature: a package needs the largest of its features'.
FEATURE_VERSION = {
    Feature.LORA_DELTA: 2,
    Feature.LORA_DELTA_Q8: 2,
    Feature.BLOCK_OFFSET: 3,
    Feature.MATMUL_Q4: 4,
    Feature.W8A8: 5,
    Feature.MATMUL_Q8: 6,
}
MIN_PACKAGE_VERSION = 2  # the oldest contract a package records


def version_for(features: Iterable[Feature]) -> int:
    return max([MIN_PACKAGE_VERSION, *(FEATURE_VERSION[Feature(f)] for f in features)])


# Input positions of the branch operators' optional inputs (after x, A, [A_scale,] B, [B_scale]):
# base, extra (addends shaped like the output), offsets (int4's float offsets), packed (the int4 weight).
BRANCH_ADDENDS = ("base", "extra", "offsets", "packed")

W8A8_BLOB = "lora.w8a8"  # the one adapter input of a w8a8 package's q8x branches
Q8X_WIDTH = 16  # a q8x B's chunk width must be a multiple of this (one vector of columns)
Q8X_K_BLOCK = 32  # A's rows are zero-padded to a multiple of this (the int4 activations' block)
BLOB_ALIGN = 64  # every array in the blob starts at a multiple of this many bytes
# The blob: int64 n, then per branch these 8 int64, then the arrays, each at a multiple of BLOB_ALIGN bytes.
BLOB_FIELDS = ("a_offset", "a_scale_offset", "b_offset", "b_scale_offset", "rank", "chunks", "chunk_rank", "chunk_width")


def scale_names(a_name: str, b_name: str) -> tuple[str, str]:
    """The graph inputs holding the int8 scales of lora_A (one per column) and lora_B (one per row)."""
    return f"{a_name}_scale", f"{b_name}_scale"
