// The inner loops on AVX2 (with FMA and F16C): 8 float32 lanes per vector for the float products, and the int8
// products as u8 x s8 pairs (maddubs) summed to int32 (madd with ones) where AVX-512 VNNI is missing. Each function
// does what whole vectors cover and returns where it stopped; dot.h hands the rest to dot_portable.h.
#pragma once

#include "common.h"
#include "matmul_q4.h"

#if defined(LE_AVX2)
namespace lora_edge::avx2 {

// acc[v] += x[k] * A[k, r0 + 8v] over k, V vectors of 8 ranks, the k loop unrolled U times so
// that U * V independent FMA chains hide the FMA latency.
template <class E, int V, int U>
void x_times_a_block(const float* x, const typename E::T* a, float* t, int64_t K, int64_t R, int64_t r0) {
  __m256 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      __m256 xv = _mm256_set1_ps(x[k + u]);
      const typename E::T* p = a + (k + u) * R + r0;
      for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(xv, E::eight(p + 8 * v), acc[u][v]);
    }
  for (; k < K; ++k) {
    __m256 xv = _mm256_set1_ps(x[k]);
    for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(xv, E::eight(a + k * R + r0 + 8 * v), acc[0][v]);
  }
  for (int v = 0; v < V; ++v) {
    __m256 s = acc[0][v];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][v]);
    _mm256_storeu_ps(t + r0 + 8 * v, s);
  }
}

// t[0:r0] = x[0:K] @ A[:, 0:r0] (K, R), A row-major, in blocks of 8 ranks; returns r0.
template <class E>
int64_t x_times_a(const float* x, const typename E::T* a, float* t, int64_t K, int64_t R) {
  int64_t r0 = 0;
  // three modules of rank 16 (q/k/v) in one pass: twelve accumulators, and A read once
  for (; r0 + 48 <= R; r0 += 48) x_times_a_block<E, 6, 2>(x, a, t, K, R, r0);
  for (; r0 + 32 <= R; r0 += 32) x_times_a_block<E, 4, 2>(x, a, t, K, R, r0);
  if (R - r0 >= 24) x_times_a_block<E, 3, 2>(x, a, t, K, R, r0), r0 += 24;
  else if (R - r0 >= 16) x_times_a_block<E, 2, 4>(x, a, t, K, R, r0), r0 += 16;
  else if (R - r0 >= 8) x_times_a_block<E, 1, 8>(x, a, t, K, R, r0), r0 += 8;
  return r0;
}

constexpr int64_t kColumnBlock = 64;  // columns of B per pass down its rows: 8 vectors of 8 accumulators

// y[n0:n] += t[0:r] @ b[:, n0:n], b (r, ldb) row-major, in blocks of 64 columns, then of 8; returns n. Each block of 64
// columns walks down the r rows, one short strided stream that the hardware prefetcher barely starts on, so each row
// also prefetches its columns two blocks ahead.
template <class E>
int64_t t_times_b(const float* t, const typename E::T* b, float* y, int64_t r, int64_t ldb, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kColumnBlock <= n1; n += kColumnBlock) {
    constexpr int kV = kColumnBlock / 8;
    __m256 c[kV];
    for (int v = 0; v < kV; ++v) c[v] = _mm256_loadu_ps(y + n + 8 * v);
    const typename E::T* p = b + n;
    for (int64_t i = 0; i < r; ++i, p += ldb) {
      prefetch_lines(p, 2 * kColumnBlock * sizeof(typename E::T), kColumnBlock * sizeof(typename E::T));
      __m256 tv = _mm256_set1_ps(t[i]);
      for (int v = 0; v < kV; ++v) c[v] = _mm256_fmadd_ps(tv, E::eight(p + 8 * v), c[v]);
    }
    for (int v = 0; v < kV; ++v) _mm256_storeu_ps(y + n + 8 * v, c[v]);
  }
  for (; n + 8 <= n1; n += 8) {
    __m256 c0 = _mm256_loadu_ps(y + n);
    const typename E::T* p = b + n;
    for (int64_t i = 0; i < r; ++i, p += ldb) c0 = _mm256_fmadd_ps(_mm256_set1_ps(t[i]), E::eight(p), c0);
    _mm256_storeu_ps(y + n, c0);
  }
  return n;
}

// The sum of x[k:k1]'s whole vectors of 8, k advanced past them.
inline float sum(const float* x, int64_t& k, int64_t k1) {
  __m256 acc = _mm256_setzero_ps();
  for (; k + 8 <= k1; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + k));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// MatMulQ4's y[m0:m0+rows, group g's columns] += the product (matmul_q4.h's layout): as on AVX-512 VNNI, over two
// halves of 8 columns: u8 x s8 pairs (maddubs, at most 2 * 15 * 127: no saturation) summed to int32 (madd with ones)
template <int rows, bool Offsets>
void q4_group_rows(const Q4Job& j, int64_t g, int64_t m0) {
  constexpr int64_t rec = q4_record<Offsets>();
  const int64_t kp = j.nb * kQ4Block, c0 = g * kQ4Group, width = std::min(kQ4Group, j.N - c0);
  const uint8_t* p = j.w + g * j.nb * rec;
  const int8_t* xq = j.x->q.data() + m0 * kp;
  const size_t st = (size_t)(m0 * j.nb);
  const float *d = j.x->d.data() + st, *zs = j.x->zero_share.data() + st, *bs = j.x->sums.data() + st;
  __m256 acc[rows][2];
  for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < j.nb; ++b, p += rec) {
    q4_prefetch<rec>(p);
    for (int h = 0; h < 2; ++h) {
      __m256i dot[rows];
      for (int r = 0; r < rows; ++r) dot[r] = _mm256_setzero_si256();
      for (int v = 0; v < 4; ++v) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(p + 64 * v + 32 * h));
        const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        for (int r = 0; r < rows; ++r) {
          const int8_t* xv = xq + r * kp + b * kQ4Block + 8 * v;
          int32_t x0, x1;
          std::memcpy(&x0, xv, 4), std::memcpy(&x1, xv + 4, 4);
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)),
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs, ones));
        }
      }
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + kQ4Codes + 16 * h)));
      const __m256 o = Offsets ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + kQ4Codes + 32 + 16 * h))) : _mm256_setzero_ps();
      for (int r = 0; r < rows; ++r) {
        const size_t i = (size_t)(r * j.nb + b);
        const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(d[i]), _mm256_set1_ps(zs[i]));
        acc[r][h] = _mm256_fmadd_ps(s, t, acc[r][h]);
        if constexpr (Offsets) acc[r][h] = _mm256_fmadd_ps(o, _mm256_set1_ps(bs[i]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    float out[kQ4Group];
    _mm256_storeu_ps(out, acc[r][0]), _mm256_storeu_ps(out + 8, acc[r][1]);
    float* y = j.y + (m0 + r) * j.N + c0;
    for (int64_t c = 0; c < width; ++c) y[c] += out[c];
  }
}

// t[0:r0] for one row, A in the q8x order (lora_delta_q8.h), 8 ranks per vector; returns r0. Signed pairs through
// maddubs with the sign trick (|a| x sign(x, a): at most 2 * 127 * 127, no saturation), summed to int32 by madd with
// ones (the codes unbiased first, so no +128 correction).
inline int64_t x_times_a_q8x(const int8_t* xq, const float* d, const uint8_t* a, float* t, int64_t nb, int64_t R) {
  int64_t r0 = 0;
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  for (; r0 + 8 <= R; r0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i dot = _mm256_setzero_si256();
      const uint8_t* p = a + (b * 8 * R + r0) * 4;
      for (int q = 0; q < 8; ++q, p += R * 4) {
        int32_t xv;
        std::memcpy(&xv, xq + b * kQ4Block + 4 * q, 4);
        const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p), flip);
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(_mm256_set1_epi32(xv), w));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
      }
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[b]), acc);
    }
    _mm256_storeu_ps(t + r0, acc);
  }
  return r0;
}

// y[n0:n] for one row and chunk, B in the q8x order (lora_delta_q8.h), 8 columns per vector, as x_times_a_q8x; returns n.
inline int64_t t_times_b_q8x(const int8_t* tq, float dt, const uint8_t* b, float* y, int64_t rq, int64_t c, int64_t n0,
                             int64_t n1) {
  int64_t n = n0;
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  const __m256 scale = _mm256_set1_ps(dt);
  for (; n + 8 <= n1; n += 8) {
    __m256i dot = _mm256_setzero_si256();
    for (int64_t q = 0; q < rq; ++q) {
      int32_t tv;
      std::memcpy(&tv, tq + 4 * q, 4);
      const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(b + (q * c + n) * 4)), flip);
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(_mm256_set1_epi32(tv), w));
      dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
    }
    _mm256_storeu_ps(y + n, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, _mm256_loadu_ps(y + n)));
  }
  return n;
}

// MatMulQ8: one row of x against one column (matmul_q8.h), a block of 32 per vector. maddubs multiplies u8 by s8 and
// saturates each pair's sum to int16, so the signs move onto x: |w| (at most 128) times x * sign(w) (|x| <= 127),
// whose pairs stay within 2 * 128 * 127 = 32512.
inline float q8_dot(const uint8_t* w, const uint16_t* s, const int8_t* xq, const float* d, int64_t nb) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + b * 32)), flip);  // the signed codes
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + b * 32));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
    acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(d[b] * _cvtsh_ss(s[b])), acc);
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

}  // namespace lora_edge::avx2
#endif
