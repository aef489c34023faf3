// The int8 products on AVX-512 VNNI (with BW): vpdpbusd multiplies 64 u8 by 64 s8 and adds each lane's 4 products
// to its int32, so one 512-bit register is 16 columns (or ranks) x 4 products: 64 multiply-adds in one instruction.
// The u8 side is the weights' codes (int4's 0..15, or a q8x code + 128, whose +128 comes back out as 128 x the s8
// side's sum), the s8 side x's or the ranks' int8 codes. The q8x functions do what whole vectors cover and return where
// they stopped; dot.h hands the rest to dot_portable.h.
#pragma once

#include "common.h"
#include "matmul_q4.h"

#if defined(LE_AVX512VNNI)
namespace lora_edge::avx512vnni {

// MatMulQ4's y[m0:m0+rows, group g's columns] += the product (matmul_q4.h's layout): one lane per column, each block's
// 32 codes as 4 vectors of low and high nibbles against x's codes broadcast 4 at a time.
template <int rows, bool Offsets>
void q4_group_rows(const Q4Job& j, int64_t g, int64_t m0) {
  constexpr int64_t rec = q4_record<Offsets>();
  const int64_t kp = j.nb * kQ4Block, c0 = g * kQ4Group, width = std::min(kQ4Group, j.N - c0);
  const uint8_t* p = j.w + g * j.nb * rec;
  const int8_t* xq = j.x->q.data() + m0 * kp;
  const size_t st = (size_t)(m0 * j.nb);
  const float *d = j.x->d.data() + st, *zs = j.x->zero_share.data() + st, *bs = j.x->sums.data() + st;
  __m512 acc[rows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < j.nb; ++b, p += rec) {
    q4_prefetch<rec>(p);
    __m512i dot[rows];
    for (int r = 0; r < rows; ++r) dot[r] = _mm512_setzero_si512();
    for (int v = 0; v < 4; ++v) {
      const __m512i w = _mm512_loadu_si512((const void*)(p + 64 * v));
      const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
      for (int r = 0; r < rows; ++r) {
        const int8_t* xv = xq + r * kp + b * kQ4Block + 8 * v;
        int32_t x0, x1;
        std::memcpy(&x0, xv, 4), std::memcpy(&x1, xv + 4, 4);
        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(x0));
        dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(x1));
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + kQ4Codes)));
    const __m512 o = Offsets ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + kQ4Codes + 32))) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const size_t i = (size_t)(r * j.nb + b);
      const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(d[i]), _mm512_set1_ps(zs[i]));
      acc[r] = _mm512_fmadd_ps(s, t, acc[r]);
      if constexpr (Offsets) acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(bs[i]), acc[r]);
    }
  }
  const __mmask16 keep = (__mmask16)((1u << width) - 1u);
  for (int r = 0; r < rows; ++r) {
    float* y = j.y + (m0 + r) * j.N + c0;
    _mm512_mask_storeu_ps(y, keep, _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(keep, y)));
  }
}

constexpr int64_t kQ8xAhead = 4;  // blocks of A's rows prefetched ahead of the x @ A loop

// t[0:R] = sum over blocks b of d_b * (xq_b . A_b) for one row, A in the q8x order (lora_delta_q8.h), R a multiple
// of 4, masked vectors of 16 ranks; returns where it stopped (at or past R: nothing is left over).
inline int64_t x_times_a_q8x(const int8_t* xq, const float* d, const int32_t* qsum, const uint8_t* a, float* t, int64_t nb,
                             int64_t R) {
  int64_t r0 = 0;
  for (; r0 < R; r0 += 64) {  // up to 4 vectors of 16 ranks per pass over A's rows
    const int64_t nv = std::min<int64_t>(4, (R - r0 + 15) / 16);
    __mmask16 mask[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t lanes = std::max<int64_t>(0, std::min<int64_t>(16, R - r0 - 16 * v));
      mask[v] = (__mmask16)((1u << lanes) - 1u);
    }
    __m512 acc[4];
    for (int v = 0; v < 4; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512i dot[4];
      for (int v = 0; v < 4; ++v) dot[v] = _mm512_setzero_si512();
      const uint8_t* p = a + (b * 8 * R + r0) * 4;
      prefetch_lines(p, (size_t)(kQ8xAhead * 8 * R * 4), (size_t)(8 * R * 4));  // A is cold (read once per token)
      for (int q = 0; q < 8; ++q, p += R * 4) {
        int32_t xv;
        std::memcpy(&xv, xq + b * kQ4Block + 4 * q, 4);
        const __m512i xb = _mm512_set1_epi32(xv);
        for (int v = 0; v < 4; ++v)
          if (v < nv) dot[v] = _mm512_dpbusd_epi32(dot[v], _mm512_maskz_loadu_epi32(mask[v], p + 64 * v), xb);
      }
      const __m512i bias = _mm512_set1_epi32(128 * qsum[b]);  // the u8 codes' +128, times x's codes
      for (int v = 0; v < 4; ++v)
        if (v < nv) acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[v], bias)), _mm512_set1_ps(d[b]), acc[v]);
    }
    for (int v = 0; v < 4; ++v)
      if (v < nv) _mm512_mask_storeu_ps(t + r0 + 16 * v, mask[v], acc[v]);
  }
  return r0;
}

// y[n0:n] += dt * (tq . B[:, n]) for one row and chunk: tq (4 rq) int8 ranks with codes' sum tsum, B the chunk's
// (rq, c, 4) q8x bytes, in blocks of 64 columns, then of 16; returns n.
inline int64_t t_times_b_q8x(const int8_t* tq, float dt, int32_t tsum, const uint8_t* b, float* y, int64_t rq, int64_t c,
                             int64_t n0, int64_t n1) {
  int64_t n = n0;
  const __m512 scale = _mm512_set1_ps(dt);
  const __m512i bias = _mm512_set1_epi32(128 * tsum);
  for (; n + 64 <= n1; n += 64) {
    __m512i dot[4];
    for (int v = 0; v < 4; ++v) dot[v] = _mm512_setzero_si512();
    for (int64_t q = 0; q < rq; ++q) {
      int32_t tv;
      std::memcpy(&tv, tq + 4 * q, 4);
      const __m512i tb = _mm512_set1_epi32(tv);
      const uint8_t* p = b + (q * c + n) * 4;
      for (int v = 0; v < 4; ++v) dot[v] = _mm512_dpbusd_epi32(dot[v], _mm512_loadu_si512((const void*)(p + 64 * v)), tb);
    }
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(y + n + 16 * v, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[v], bias)), scale,
                                                        _mm512_loadu_ps(y + n + 16 * v)));
  }
  for (; n + 16 <= n1; n += 16) {
    __m512i dot = _mm512_setzero_si512();
    for (int64_t q = 0; q < rq; ++q) {
      int32_t tv;
      std::memcpy(&tv, tq + 4 * q, 4);
      dot = _mm512_dpbusd_epi32(dot, _mm512_loadu_si512((const void*)(b + (q * c + n) * 4)), _mm512_set1_epi32(tv));
    }
    _mm512_storeu_ps(y + n, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, bias)), scale, _mm512_loadu_ps(y + n)));
  }
  return n;
}

// MatMulQ8: one row of x against one column (matmul_q8.h), two blocks of 32 per vpdpbusd: lanes 0-7 hold the first
// block's 4-product sums, lanes 8-15 the second's, each scaled by its block's d_b s_b (16 blocks' at a time, spread
// over the lanes by one permute); the codes' +128 comes back out as 128 d_b s_b times x's code sum, per block.
inline float q8_dot(const uint8_t* w, const uint16_t* s, const int8_t* xq, const float* d, const int32_t* qsum, int64_t nb) {
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t n = std::min<int64_t>(16, nb - b0);
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    const __m256i halfs = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)m, s + b0));
    const __m512 ds = _mm512_mul_ps(_mm512_cvtph_ps(halfs), _mm512_maskz_loadu_ps(m, d + b0));
    const __m512 bias = _mm512_cvtepi32_ps(_mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, qsum + b0), 7));
    acc = _mm512_fnmadd_ps(ds, bias, acc);
    for (int64_t p = 0; p < n; p += 2) {
      const __mmask64 bytes = n - p >= 2 ? ~0ull : 0xffffffffull;
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_loadu_epi8(bytes, w + (b0 + p) * 32),
                                              _mm512_maskz_loadu_epi8(bytes, xq + (b0 + p) * 32));
      const __m512 scale = _mm512_permutexvar_ps(_mm512_add_epi32(halves, _mm512_set1_epi32((int)p)), ds);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
    }
  }
  return _mm512_reduce_add_ps(acc);
}

}  // namespace lora_edge::avx512vnni
#endif
