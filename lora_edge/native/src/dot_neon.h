// The int8 products on 64-bit ARM (AdvSIMD, "NEON"): MatMulQ4 and LoraDeltaQ8's q8x order. Both layouts keep 4
// consecutive codes of one column (or rank) in 4 adjacent bytes, which is what SDOT wants: vdotq_s32 multiplies 16 s8
// by 16 s8 and adds each group of 4 products to one int32 lane, so one 128-bit register is 4 columns x 4 products.
// Where the CPU lacks the dot-product instructions (before Armv8.2's DotProd) the same 4-product sums come from
// widening multiplies and pairwise adds (dot4 below). Each function does what whole vectors cover and returns where
// it stopped; dot.h hands the rest to dot_portable.h. The float32 products stay in dot_portable.h, whose
// contiguous loops the compiler vectorises on AdvSIMD.
#pragma once

#include "common.h"
#include "matmul_q4.h"

#if defined(LE_NEON)
namespace lora_edge::neon {

// acc[l] += sum over i < 4 of a[4 l + i] * b[4 l + i], exactly. Without SDOT: 8 + 8 products to int16 (vmull), pairs
// summed in int16 (each pair |a b| <= 2 * 128 * 127 = 32512: no overflow), then pairs again into the int32 lanes.
inline int32x4_t dot4(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(LE_NEON_DOTPROD)
  return vdotq_s32(acc, a, b);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b)), hi = vmull_high_s8(a, b);
  return vpadalq_s16(acc, vpaddq_s16(lo, hi));
#endif
}

// 4 int8 codes (x[0:4]) in every 32-bit lane.
inline int8x16_t broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

// 4 float16 values at p (any alignment) as float32.
inline float32x4_t four_halves(const uint8_t* p) { return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p))); }

// MatMulQ4's y[m0:m0+rows, group g's columns] += the product (matmul_q4.h's layout): each 16 bytes of a vector v are
// 4 columns' codes at k = 8 v .. 8 v + 3 (low nibbles) and 8 v + 4 .. 8 v + 7 (high), against x's codes broadcast
// 4 at a time; 4 registers of 4 columns per row.
template <int rows, bool Offsets>
void q4_group_rows(const Q4Job& j, int64_t g, int64_t m0) {
  constexpr int64_t rec = q4_record<Offsets>();
  const Q4Tile tile(j, g, m0);
  const uint8_t* p = tile.p;
  float32x4_t acc[rows][4];
  for (int r = 0; r < rows; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = vdupq_n_f32(0.f);
  const uint8x16_t low = vdupq_n_u8(0x0f);
  for (int64_t b = 0; b < j.nb; ++b, p += rec) {
    q4_prefetch<rec>(p);
    int32x4_t dot[rows][4];
    for (int r = 0; r < rows; ++r)
      for (int q = 0; q < 4; ++q) dot[r][q] = vdupq_n_s32(0);
    for (int v = 0; v < 4; ++v) {
      int8x16_t x0[rows], x1[rows];
      for (int r = 0; r < rows; ++r) {
        const int8_t* xv = tile.xq + r * tile.kp + b * kQ4Block + 8 * v;
        x0[r] = broadcast4(xv), x1[r] = broadcast4(xv + 4);
      }
      for (int q = 0; q < 4; ++q) {
        const uint8x16_t w = vld1q_u8(p + 64 * v + 16 * q);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(w, low)), hi = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));
        for (int r = 0; r < rows; ++r) dot[r][q] = dot4(dot4(dot[r][q], lo, x0[r]), hi, x1[r]);
      }
    }
    for (int q = 0; q < 4; ++q) {
      const float32x4_t s = four_halves(p + kQ4Codes + 8 * q);
      const float32x4_t o = Offsets ? four_halves(p + kQ4Codes + 32 + 8 * q) : vdupq_n_f32(0.f);
      for (int r = 0; r < rows; ++r) {
        const size_t i = (size_t)(r * j.nb + b);
        const float32x4_t t = vsubq_f32(vmulq_n_f32(vcvtq_f32_s32(dot[r][q]), tile.d[i]), vdupq_n_f32(tile.zs[i]));
        acc[r][q] = vfmaq_f32(acc[r][q], s, t);
        if constexpr (Offsets) acc[r][q] = vfmaq_n_f32(acc[r][q], o, tile.bs[i]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    float out[kQ4Group];
    for (int q = 0; q < 4; ++q) vst1q_f32(out + 4 * q, acc[r][q]);
    float* y = j.y + (m0 + r) * j.N + tile.c0;
    for (int64_t c = 0; c < tile.width; ++c) y[c] += out[c];
  }
}

// The q8x bytes at p (code XOR 0x80) back to the signed codes.
inline int8x16_t unbias16(const uint8_t* p) { return vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), vdupq_n_u8(0x80))); }

// t[r0:r0 + 4 V] for one row, A in the q8x order (lora_delta_q8.h): V registers of 4 ranks.
template <int V>
void x_times_a_q8x_block(const int8_t* xq, const float* d, const uint8_t* a, float* t, int64_t nb, int64_t R, int64_t r0) {
  float32x4_t acc[V];
  for (int v = 0; v < V; ++v) acc[v] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; ++b) {
    int32x4_t dot[V];
    for (int v = 0; v < V; ++v) dot[v] = vdupq_n_s32(0);
    const uint8_t* p = a + (b * 8 * R + r0) * 4;
    for (int q = 0; q < 8; ++q, p += R * 4) {
      const int8x16_t xb = broadcast4(xq + b * kQ4Block + 4 * q);
      for (int v = 0; v < V; ++v) dot[v] = dot4(dot[v], unbias16(p + 16 * v), xb);
    }
    for (int v = 0; v < V; ++v) acc[v] = vfmaq_n_f32(acc[v], vcvtq_f32_s32(dot[v]), d[b]);
  }
  for (int v = 0; v < V; ++v) vst1q_f32(t + r0 + 4 * v, acc[v]);
}

// t[0:r0] for one row, A in the q8x order, 16 ranks per pass over A's rows, then 4; returns r0 (R: a multiple of 4).
inline int64_t x_times_a_q8x(const int8_t* xq, const float* d, const uint8_t* a, float* t, int64_t nb, int64_t R) {
  int64_t r0 = 0;
  for (; r0 + 16 <= R; r0 += 16) x_times_a_q8x_block<4>(xq, d, a, t, nb, R, r0);
  for (; r0 + 4 <= R; r0 += 4) x_times_a_q8x_block<1>(xq, d, a, t, nb, R, r0);
  return r0;
}

// y[n0:n] += dt * (tq . B[:, n]) for one row and chunk, B the chunk's (rq, c, 4) q8x bytes, 16 columns per pass
// (4 registers), then 4; returns n.
inline int64_t t_times_b_q8x(const int8_t* tq, float dt, const uint8_t* b, float* y, int64_t rq, int64_t c, int64_t n0,
                             int64_t n1) {
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    int32x4_t dot[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int64_t q = 0; q < rq; ++q) {
      const int8x16_t tb = broadcast4(tq + 4 * q);
      const uint8_t* p = b + (q * c + n) * 4;
      for (int v = 0; v < 4; ++v) dot[v] = dot4(dot[v], unbias16(p + 16 * v), tb);
    }
    for (int v = 0; v < 4; ++v) vst1q_f32(y + n + 4 * v, vfmaq_n_f32(vld1q_f32(y + n + 4 * v), vcvtq_f32_s32(dot[v]), dt));
  }
  for (; n + 4 <= n1; n += 4) {
    int32x4_t dot = vdupq_n_s32(0);
    for (int64_t q = 0; q < rq; ++q) dot = dot4(dot, unbias16(b + (q * c + n) * 4), broadcast4(tq + 4 * q));
    vst1q_f32(y + n, vfmaq_n_f32(vld1q_f32(y + n), vcvtq_f32_s32(dot), dt));
  }
  return n;
}

// MatMulQ8: one row of x against one column (matmul_q8.h), a block of 32 per two registers.
inline float q8_dot(const uint8_t* w, const uint16_t* s, const int8_t* xq, const float* d, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int32x4_t dot = dot4(dot4(vdupq_n_s32(0), unbias16(w + b * 32), vld1q_s8(xq + b * 32)), unbias16(w + b * 32 + 16),
                               vld1q_s8(xq + b * 32 + 16));
    acc += d[b] * half_to_float(s[b]) * (float)vaddvq_s32(dot);
  }
  return acc;
}

}  // namespace lora_edge::neon
#endif
