// BlockOffset(x, offsets, base) -> base + blocksum(x) @ offsets: the float-offset correction of a block-quantized
// projection whose integer part ONNX Runtime's MatMulNBits computes. offsets (n_blocks, N) float16; blocksum(x)
// (..., n_blocks) the sums of x over blocks of attribute `block` along K (the last block may be short). ONNX's own
// ops take four nodes for it (Reshape, ReduceSum, MatMul, Add) and read the offsets as float32. LoraDelta and
// LoraDeltaQ8 take the same correction as their optional input `offsets` (attribute `offset_block`) and run it in
// their B product's pass, so a quantized projection with its adapter is MatMulNBits + one node.
#pragma once

#include "common.h"

namespace lora_edge {

// The float16 offsets' rows of a y += blocksum(x) @ offsets: a second product over the same columns,
// run inside the B product's tasks so that a node with both pays for one pass and one ParallelFor.
struct OffsetRows {
  const float* s = nullptr;  // (M, nb) block sums
  const uint16_t* o = nullptr;  // (nb, N)
  int64_t nb = 0;
};

using BlockSums = Scratch<float, 1024>;  // a decode step's block sums stay on the stack

// The rows of y (M, N) += blocksum(x) @ offsets: x (M, K) float32, offsets (nb, N) float16 (a tensor of
// the node's), checked; x's block sums go to s_mem. nb is 0 when there is nothing to add.
OffsetRows block_offset_rows(const Ort::ConstValue& offsets, const float* x, BlockSums& s_mem, int64_t M, int64_t K,
                             int64_t N, int64_t block, const char* op);

// y (M, N) += the offsets' product alone (no LoRA ranks to share its pass).
void add_offset_rows(Ort::KernelContext& ctx, const OffsetRows& rows, float* y, int64_t M, int64_t N);

}  // namespace lora_edge
