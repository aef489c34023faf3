// MatMulQ4(x, packed) -> x @ W_hat.T: the int4 projection, offsets included, from one packed stream per node, in
// place of ONNX Runtime's MatMulNBits and a separate correction for the float offsets. LoraDelta and LoraDeltaQ8 take
// the same weight as their last optional input `packed` and run it in their B product's tasks (branch.h): an int4
// projection with its adapter is one node.
//
// y (M, N) = x (M, K) @ W_hat.T with W_hat[n, k] = (q[n, k] - 8) * scale[n, b] + offset[n, b], b = k / 32, in
// one stream per node: `packed` (G, nb, 320) uint8, G = ceil(N / 16) groups of 16 output columns; per group
// and block of 32 along K (K zero-padded to nb * 32), 256 bytes of codes then 16 float16 scales and 16
// float16 offsets. The codes are 4 vectors of 64 bytes; in vector v, byte 4 j + i holds column 16 g + j's
// code at k = 8 v + i (low nibble) and 8 v + 4 + i (high nibble), so that one lane of a 512-bit register
// is one column's 4 consecutive codes: u8 x s8 dot products (VNNI's vpdpbusd, AVX2's maddubs) against
// x's int8 codes, with no horizontal sums. x is quantized per block of 32, symmetric int8 (d = max|x| / 127),
// as MatMulNBits does at accuracy level 4; the offsets multiply x's exact block sums. lora-edge's exporter
// writes this layout (pack_q4, lora_edge's quant blocks). Columns past N (padding) have zero scales and offsets.
//
// Symmetric blocks (llama.cpp's Q4_0: W_hat[n, k] = (q[n, k] - 8) * scale[n, b]) drop the offsets: records of 288
// bytes, (G, nb, 288), 4.5 bits per weight against 5. The record size tells the two apart.
#pragma once

#include "common.h"

namespace lora_edge {

constexpr int64_t kQ4Block = 32, kQ4Group = 16, kQ4Bytes = 320, kQ4Codes = 256, kQ4SymBytes = 288;

// A record's bytes: codes, scales and (with Offsets) offsets.
template <bool Offsets>
constexpr int64_t q4_record() {
  return Offsets ? kQ4Bytes : kQ4SymBytes;
}

struct Q4Job {
  const uint8_t* w;  // (G, nb, 320), or (G, nb, 288) without offsets
  const QuantizedRows* x;
  float* y;  // (M, N): the products are added onto it
  int64_t M, N, nb, G;
  bool offsets;  // records of 320 bytes (float offsets) or 288 (symmetric blocks)
};

// What one q4_group_rows call reads (group g, rows from m0): the group's packed records, x's codes and per-block
// figures (QuantizedRows) from row m0, and the group's first column and width (the last group may be short).
struct Q4Tile {
  const uint8_t* p;
  const int8_t* xq;
  const float *d, *zs, *bs;
  int64_t kp, c0, width;
  Q4Tile(const Q4Job& j, int64_t g, int64_t m0)
      : p(j.w + g * j.nb * (j.offsets ? kQ4Bytes : kQ4SymBytes)), xq(j.x->q.data() + m0 * j.nb * kQ4Block), d(j.x->d.data() + m0 * j.nb),
        zs(j.x->zero_share.data() + m0 * j.nb), bs(j.x->sums.data() + m0 * j.nb), kp(j.nb * kQ4Block),
        c0(g * kQ4Group), width(std::min(kQ4Group, j.N - g * kQ4Group)) {}
};

// The stream runs ahead of the hardware prefetcher, which stops at each 4 KB page: records 16 blocks ahead
// (5 KB) into L1 and 64 blocks ahead (20 KB) into L2. Measured on 66 MB of synthetic layers at 1 thread:
// without it 0.66x MatMulNBits' speed, L1 alone 1.0x, both 1.25x.
// (Addresses formed as integers, as in prefetch_lines: past the last record they point nowhere.)
template <int64_t Rec>
inline void q4_prefetch(const uint8_t* p) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  for (int o = 0; o < Rec; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + 16 * Rec + o), 0, 3);
  for (int o = 0; o < Rec; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + 64 * Rec + o), 0, 2);
}

// x (M, K) to `out`, per block of 32 along K (nb blocks, the last zero-padded).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t nb, QuantizedRows& out);

// y[:, groups g0..g1-1's columns] += the product: each group's weights serve all rows (tiles of 4) from cache.
void q4_groups(const Q4Job& j, int64_t g0, int64_t g1);

// y (M, N) += the whole product, over the session's threads.
void run_q4(Ort::KernelContext& ctx, Q4Job& job);

// The packed weight (checked against K and N) and x's quantized rows, for a product onto y.
Q4Job q4_job(const Ort::ConstValue& packed, const float* x, QuantizedRows& qx, float* y, int64_t M, int64_t K, int64_t N,
             const char* op);

}  // namespace lora_edge
