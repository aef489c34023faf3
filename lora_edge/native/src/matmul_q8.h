// MatMulQ8(x, codes, scales) -> x @ W_hat.T: an int8 weight in llama.cpp's Q8_0 form (symmetric blocks of 32 along K,
// one float16 scale each), read where it lies. lora-edge's native packages run their output head on it: the tied
// head reads the token embedding's own table, whose rows the graph gathers from the same initializers, so the table
// is one mapped copy, where ONNX Runtime's MatMulNBits prepacks it into a second one on the heap (float32 scales and
// block sums beside the codes: 34 MiB against 28.7 for SmolLM2's table).
//
// y (M, N) = x (M, K) @ W_hat.T with W_hat[n, k] = (codes[n, k] - 128) * scales[n, k / 32]: codes (N, nb, 32) uint8
// (MatMulNBits' 8-bit layout with its implied zero point 128: the signed code + 128), scales (N, nb) float16, K
// zero-padded to nb * 32 (padding codes 128). x is quantized per block of 32 as for MatMulQ4 (quantize_rows): the
// products are exact integer dot products of the codes, scaled per block by x's and the weight's scales.
#pragma once

#include "common.h"

namespace lora_edge {

constexpr int64_t kQ8Block = 32;

struct Q8Job {
  const uint8_t* codes;  // (N, nb, 32)
  const uint16_t* scales;  // (N, nb) float16 bits
  const QuantizedRows* x;
  float* y;  // (M, N)
  int64_t M, N, nb;
};

// y[:, n0:n1] = the product, a tile of columns at a time (each tile's codes serve every row from cache).
void q8_columns(const Q8Job& j, int64_t n0, int64_t n1);

}  // namespace lora_edge
