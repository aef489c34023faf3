// LoraDeltaQ8(x, A, A_scale, B, B_scale[, base, extra, offsets, packed]): LoraDelta (lora_delta.h) with int8 A and B,
// in one of three forms.
//
// 2-D: A (K, R) int8 with A_scale (R) float32, one scale per column (rank); B (R, N) or (chunks, r, c) int8 with
// B_scale (R) or (chunks, r) float32, one scale per row: half the bytes of float16 again (at batch 1 each branch's
// weights are read once per token, mostly from beyond the caches).
//
// q8x: A and B as 3-D / 4-D int8 tensors in the order of u8 x s8 dot products of 4 (VNNI's vpdpbusd): A (Kp / 4, R, 4),
// byte [q, r, i] the code of A[4 q + i, r] XOR 0x80 (the code + 128 as a u8), Kp = ceil(K / 32) * 32 (padding rows
// code 0); B (chunks, r / 4, c, 4), byte [j, q, n, i] the code of chunk j's B[4 q + i, n] XOR 0x80, r a multiple of 4
// and c of 16. Scales as for the 2-D layout. One 512-bit register is then 16 ranks (or columns) x 4 products, so 64
// multiply-adds are one instruction, against 24 for the float path: at batch 1 the float path's instructions, not its
// bytes, were the branch's cost (int8 and float16 A/B measured the same). x is quantized per block of 32 as for
// MatMulQ4 (the same codes when the node runs its int4 base), x @ A's ranks per chunk to int8 (one scale per chunk
// and row) for the B product. Each instruction set's path computes exact integer dot products of the signed codes.
//
// w8a8: A a 1-D int8 tensor, the blob that holds every q8x branch of a package, with attribute `slot` and no A_scale,
// B, B_scale. A w8a8 package's adapter is then one input for all its q8x branches, so that a run binds one input where
// it bound four per branch (ONNX Runtime's per-run cost of a bound input, ~0.6 us each, was 0.3 ms of a token's 0.6 ms
// of branch with 480). Layout: contract.h (lora_edge.native.encode.w8a8_blob writes it).
#pragma once

#include "common.h"

namespace lora_edge {

// A slot's part of the w8a8 blob: its q8x A (ceil(K / 32) * 8, R, 4) and B (chunks, r / 4, c, 4), float32 scales
// A_scale (R) and B_scale (chunks, r). R = r = 0 for a branch the adapter leaves alone (chunks and c still give the
// node's output width).
struct BlobSlot {
  const uint8_t* a;
  const float* sa;
  const uint8_t* b;
  const float* sb;
  int64_t R, chunks, r, c;
};

// Slot `slot` of the blob, checked against its size and x's nb blocks of 32.
BlobSlot blob_slot(const Ort::ConstValue& blob, int64_t slot, int64_t nb);

// t (rows, r) to `out`, one scale per row.
void quantize_ranks(const float* t, int64_t rows, int64_t r, QuantizedRanks& out);

}  // namespace lora_edge
