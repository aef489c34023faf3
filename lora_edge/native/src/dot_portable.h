// The inner loops in plain C++: all of each product without a vector path for it (the float products below AVX2, on
// aarch64 and the rest, where the compiler vectorises what it can; the int8 ones without AVX2 or NEON), and the
// columns or ranks the vector paths leave over. They do
// the same arithmetic as those paths: exact integer dot products for the int8 codes, float32 otherwise.
#pragma once

#include "common.h"
#include "matmul_q4.h"

namespace lora_edge::portable {

// y[from:to] += s * row[from:to]: the portable path of both products, in the order compilers
// vectorise (contiguous innermost)
template <class E>
inline void add_scaled_row(float s, const typename E::T* row, float* y, int64_t from, int64_t to) {
  for (int64_t j = from; j < to; ++j) y[j] += s * E::one(row[j]);
}

// t[r0:R] = x[0:K] @ A[:, r0:R] (K, R), A row-major.
template <class E>
void x_times_a(const float* x, const typename E::T* a, float* t, int64_t K, int64_t R, int64_t r0) {
  for (int64_t r = r0; r < R; ++r) t[r] = 0.f;
  for (int64_t k = 0; k < K && r0 < R; ++k) add_scaled_row<E>(x[k], a + k * R, t, r0, R);
}

// y[n:n1] += t[0:r] @ b[:, n:n1], b (r, ldb) row-major.
template <class E>
void t_times_b(const float* t, const typename E::T* b, float* y, int64_t r, int64_t ldb, int64_t n, int64_t n1) {
  for (int64_t i = 0; i < r && n < n1; ++i) add_scaled_row<E>(t[i], b + i * ldb, y, n, n1);
}

// acc + x[k:k1], added in order.
inline float sum(const float* x, int64_t k, int64_t k1, float acc) {
  for (; k < k1; ++k) acc += x[k];
  return acc;
}

// MatMulQ4's y[m0:m0+rows, group g's columns] += the product (matmul_q4.h's layout), one column at a time.
template <int rows, bool Offsets>
void q4_group_rows(const Q4Job& j, int64_t g, int64_t m0) {
  constexpr int64_t rec = q4_record<Offsets>();
  const int64_t kp = j.nb * kQ4Block, c0 = g * kQ4Group, width = std::min(kQ4Group, j.N - c0);
  const uint8_t* p = j.w + g * j.nb * rec;
  const int8_t* xq = j.x->q.data() + m0 * kp;
  const size_t st = (size_t)(m0 * j.nb);
  const float *d = j.x->d.data() + st, *zs = j.x->zero_share.data() + st, *bs = j.x->sums.data() + st;
  float acc[rows][kQ4Group] = {};
  for (int64_t b = 0; b < j.nb; ++b, p += rec)
    for (int64_t c = 0; c < width; ++c) {
      const float s = half_to_float((uint16_t)(p[kQ4Codes + 2 * c] | p[kQ4Codes + 2 * c + 1] << 8));
      const float o = Offsets ? half_to_float((uint16_t)(p[kQ4Codes + 32 + 2 * c] | p[kQ4Codes + 33 + 2 * c] << 8)) : 0.f;
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* xb = xq + r * kp + b * kQ4Block;
        int32_t dot = 0;
        for (int v = 0; v < 4; ++v)
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = p[64 * v + 4 * c + i];
            dot += (byte & 0x0f) * xb[8 * v + i] + (byte >> 4) * xb[8 * v + 4 + i];
          }
        const size_t at = (size_t)(r * j.nb + b);
        acc[r][c] += s * ((float)dot * d[at] - zs[at]) + o * bs[at];
      }
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; ++c) j.y[(m0 + r) * j.N + c0 + c] += acc[r][c];
}

// A q8x byte back to its signed code (the layout stores code XOR 0x80: the code + 128 as a u8).
inline int8_t unbias(uint8_t v) { return (int8_t)(v ^ 0x80u); }

// t[r0:R] for one row, A in the q8x order (lora_delta_q8.h).
inline void x_times_a_q8x(const int8_t* xq, const float* d, const uint8_t* a, float* t, int64_t nb, int64_t R, int64_t r0) {
  for (int64_t r = r0; r < R; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t dot = 0;
      for (int64_t k = 0; k < kQ4Block; ++k) dot += xq[b * kQ4Block + k] * unbias(a[((b * 8 + k / 4) * R + r) * 4 + k % 4]);
      acc += d[b] * (float)dot;
    }
    t[r] = acc;
  }
}

// y[n:n1] for one row and chunk, B in the q8x order (lora_delta_q8.h).
inline void t_times_b_q8x(const int8_t* tq, float dt, const uint8_t* b, float* y, int64_t rq, int64_t c, int64_t n, int64_t n1) {
  for (; n < n1; ++n) {
    int32_t dot = 0;
    for (int64_t i = 0; i < 4 * rq; ++i) dot += tq[i] * unbias(b[((i / 4) * c + n) * 4 + i % 4]);
    y[n] += dt * (float)dot;
  }
}

// MatMulQ8: one row of x against one column (matmul_q8.h), block by block.
inline float q8_dot(const uint8_t* w, const uint16_t* s, const int8_t* xq, const float* d, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t dot = 0;
    for (int64_t k = 0; k < kQ4Block; ++k) dot += xq[b * kQ4Block + k] * unbias(w[b * kQ4Block + k]);
    acc += d[b] * half_to_float(s[b]) * (float)dot;
  }
  return acc;
}

}  // namespace lora_edge::portable
