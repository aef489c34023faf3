// The inner loops, each picking its instruction set at compile time (common.h's LE_AVX512VNNI, LE_AVX2, LE_NEON): the
// vector path covers what whole vectors do, dot_portable.h the rest (all of it without a vector path). The operators call
// these, never an instruction set's own.
#pragma once

#include "common.h"
#include "dot_avx2.h"
#include "dot_avx512vnni.h"
#include "dot_neon.h"
#include "dot_portable.h"
#include "matmul_q4.h"
#include "matmul_q8.h"

namespace lora_edge {

// t[0:R] = x[0:K] @ A (K, R), A row-major.
template <class E>
void x_times_a(const float* x, const typename E::T* a, float* t, int64_t K, int64_t R) {
  int64_t r0 = 0;
#if defined(LE_AVX2)
  r0 = avx2::x_times_a<E>(x, a, t, K, R);
#endif
  portable::x_times_a<E>(x, a, t, K, R, r0);  // the rest (all of it without AVX2)
}

// y[n0:n1] += t[0:r] @ b[:, n0:n1], b (r, ldb) row-major.
template <class E>
void t_times_b(const float* t, const typename E::T* b, float* y, int64_t r, int64_t ldb, int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(LE_AVX2)
  n = avx2::t_times_b<E>(t, b, y, r, ldb, n0, n1);
#endif
  portable::t_times_b<E>(t, b, y, r, ldb, n, n1);  // the rest (all of it without AVX2)
}

// s[0:nb] = the sums of x[0:K] over blocks of `block` (the last one may be short).
inline void block_sums(const float* x, float* s, int64_t K, int64_t nb, int64_t block) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * block, k1 = std::min(K, k0 + block);
    int64_t k = k0;
    float sum = 0.f;
#if defined(LE_AVX2)
    sum = avx2::sum(x, k, k1);
#endif
    s[b] = portable::sum(x, k, k1, sum);  // the rest (all of it without AVX2)
  }
}

// MatMulQ4: y[m0:m0+rows, group g's columns] += the product, for rows m0..m0+rows-1 (a constant, so that the rows'
// loops unroll), on records with float offsets or without (symmetric blocks).
template <int rows, bool Offsets>
void q4_group_rows(const Q4Job& j, int64_t g, int64_t m0) {
#if defined(LE_AVX512VNNI)
  avx512vnni::q4_group_rows<rows, Offsets>(j, g, m0);
#elif defined(LE_AVX2)
  avx2::q4_group_rows<rows, Offsets>(j, g, m0);
#elif defined(LE_NEON)
  neon::q4_group_rows<rows, Offsets>(j, g, m0);
#else
  portable::q4_group_rows<rows, Offsets>(j, g, m0);
#endif
}

// q8x: t[0:R] = sum over blocks b of d_b * (xq_b . A_b) for one row, A in the q8x order (lora_delta_q8.h), R a multiple
// of 4. Each path computes exact integer dot products of the signed codes.
inline void x_times_a_q8x(const int8_t* xq, const float* d, const int32_t* qsum, const uint8_t* a, float* t, int64_t nb,
                          int64_t R) {
  int64_t r0 = 0;
#if defined(LE_AVX512VNNI)
  r0 = avx512vnni::x_times_a_q8x(xq, d, qsum, a, t, nb, R);
#elif defined(LE_AVX2)
  r0 = avx2::x_times_a_q8x(xq, d, a, t, nb, R);
#elif defined(LE_NEON)
  r0 = neon::x_times_a_q8x(xq, d, a, t, nb, R);
#endif
  (void)qsum;
  portable::x_times_a_q8x(xq, d, a, t, nb, R, r0);  // the rest (all of it without a vector path)
}

// q8x: y[n0:n1] += dt * (tq . B[:, n]) for one row and chunk: tq (4 rq) int8 ranks, B the chunk's (rq, c, 4) q8x bytes,
// n0 and n1 multiples of 16.
inline void t_times_b_q8x(const int8_t* tq, float dt, int32_t tsum, const uint8_t* b, float* y, int64_t rq, int64_t c,
                          int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(LE_AVX512VNNI)
  n = avx512vnni::t_times_b_q8x(tq, dt, tsum, b, y, rq, c, n0, n1);
#elif defined(LE_AVX2)
  n = avx2::t_times_b_q8x(tq, dt, b, y, rq, c, n0, n1);
#elif defined(LE_NEON)
  n = neon::t_times_b_q8x(tq, dt, b, y, rq, c, n0, n1);
#endif
  (void)tsum;
  portable::t_times_b_q8x(tq, dt, b, y, rq, c, n, n1);  // the rest (all of it without a vector path)
}

// MatMulQ8: one row of x (codes xq, block scales d, code sums qsum) against one column's codes (nb blocks of 32, the
// signed code + 128) and float16 block scales s: the sum over blocks of d_b s_b (xq_b . (codes_b - 128)).
inline float q8_dot(const uint8_t* w, const uint16_t* s, const int8_t* xq, const float* d, const int32_t* qsum, int64_t nb) {
#if defined(LE_AVX512VNNI)
  return avx512vnni::q8_dot(w, s, xq, d, qsum, nb);
#elif defined(LE_AVX2)
  (void)qsum;
  return avx2::q8_dot(w, s, xq, d, nb);
#elif defined(LE_NEON)
  (void)qsum;
  return neon::q8_dot(w, s, xq, d, nb);
#else
  (void)qsum;
  return portable::q8_dot(w, s, xq, d, nb);
#endif
}

}  // namespace lora_edge
