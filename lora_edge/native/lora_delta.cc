// lora-edge's native LoRA kernel: one ONNX Runtime custom operator per adapter slot,
//   lora_edge::LoraDelta(x, A, B) -> (x @ A) @ B
// with A and B switchable float16 inputs and x, the output and the arithmetic in float32.
//
// Why it exists: ORT's CPU MatMul reads the branch's weights as float32 (twice the bytes of
// float16) and MLAS threads no GEMM under 64k multiply-adds, which every LoRA product at batch 1
// is, so the branch ran on one core at two threads. This kernel reads float16 weights (half the
// bytes), runs A and B in one node (half the nodes) and splits the B product over the session's
// intra-op thread pool.
//
// Shapes (M = the product of x's leading dims):
//   x (..., K) float32;  A (K, R) float16, R = n_modules * r;
//   B (R, N) float16 (one module), or (chunks, r, c) float16 with attribute `chunk_modules`
//   (the module each chunk reads its r ranks from; out = chunks * c).
// An empty R (no adapter bound) gives zeros.
//
//   lora_edge::LoraDelta(x, A, B, base, extra) -> base + extra + (x @ A) @ B   (kernel v2)
// base and extra are optional and shaped like the output (the base projection and, at int4, its
// float-offset correction): the node adds its delta onto the base's own sum, so an adapter costs no
// separate Add or Sum node.
//
//   lora_edge::LoraDeltaQ8(x, A, A_scale, B, B_scale[, base, extra]) -> the same with int8 A and B:
//   A (K, R) int8 with A_scale (R) float32, one scale per column (rank); B (R, N) or (chunks, r, c)
//   int8 with B_scale (R) or (chunks, r) float32, one scale per row: half the bytes of float16 again
//   (at batch 1 each branch's weights are read once per token, mostly from beyond the caches).
//
//   lora_edge::BlockOffset(x, offsets, base) -> base + blocksum(x) @ offsets      (kernel v3)
// the float-offset correction of a block-quantized projection (MatMulNBits computes the integer
// part): offsets (n_blocks, N) float16, blocksum(x) (..., n_blocks) the sums of x over blocks of
// attribute `block` along K (the last block may be short). ONNX's own ops take four nodes for it
// (Reshape, ReduceSum, MatMul, Add) and read the offsets as float32.
// LoraDelta and LoraDeltaQ8 take the same correction as an optional input `offsets` with
// attribute `offset_block`, so a quantized projection with its adapter is MatMulNBits + one node.
//
//   lora_edge::MatMulQ4(x, packed) -> x @ W_hat.T                                        (kernel v4)
// the int4 projection itself, offsets included, from one packed stream per node (see MatMulQ4 below), in
// place of MatMulNBits + the correction. LoraDelta and LoraDeltaQ8 take the same weight as a last optional
// input `packed` and compute the projection themselves, in the tasks of their B product: an int4 projection
// with its adapter is one node.
//
//   LoraDeltaQ8 with A (ceil(K / 32) * 8, R, 4) and B (chunks, r / 4, c, 4) int8                       (kernel v5)
// the same int8 codes in the order of 4-wide u8 x s8 dot products ("q8x", see below): x @ A and t @ B as
// integer dot products (VNNI's vpdpbusd, AVX2's maddubs) on x and t quantized to int8. Or A a 1-D int8 tensor,
// the w8a8 blob that holds every q8x branch of a package (one input for all of them), with attribute `slot`
// and no A_scale, B, B_scale (see BlobSlot).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
#include <immintrin.h>
#define LE_AVX2 1
#endif

namespace {

inline float half_to_float(uint16_t h) {
#if defined(LE_AVX2)
  return _cvtsh_ss(h);
#elif defined(__FLT16_MAX__)  // the compiler's own half type (aarch64, recent x86): a hardware conversion
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return (float)f;
#else
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The two stored element types: float16 (uint16_t bits) and int8 (scaled outside the inner loops).
struct F16 {
  using T = uint16_t;
  static float one(T v) { return half_to_float(v); }
#if defined(LE_AVX2)
  static __m256 eight(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#endif
};

struct I8 {
  using T = int8_t;
  static float one(T v) { return (float)v; }
#if defined(LE_AVX2)
  static __m256 eight(const T* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
#endif
};

#if defined(LE_AVX2)
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
#endif

// y[from:to] += s * row[from:to]: the portable path of both products, in the order compilers
// vectorise (contiguous innermost)
template <class E>
inline void add_scaled_row(float s, const typename E::T* row, float* y, int64_t from, int64_t to) {
  for (int64_t j = from; j < to; ++j) y[j] += s * E::one(row[j]);
}

// t[0:R] = x[0:K] @ A (K, R), A row-major.
template <class E>
void x_times_a(const float* x, const typename E::T* a, float* t, int64_t K, int64_t R) {
  int64_t r0 = 0;
#if defined(LE_AVX2)
  // three modules of rank 16 (q/k/v) in one pass: twelve accumulators, and A read once
  for (; r0 + 48 <= R; r0 += 48) x_times_a_block<E, 6, 2>(x, a, t, K, R, r0);
  for (; r0 + 32 <= R; r0 += 32) x_times_a_block<E, 4, 2>(x, a, t, K, R, r0);
  if (R - r0 >= 24) x_times_a_block<E, 3, 2>(x, a, t, K, R, r0), r0 += 24;
  else if (R - r0 >= 16) x_times_a_block<E, 2, 4>(x, a, t, K, R, r0), r0 += 16;
  else if (R - r0 >= 8) x_times_a_block<E, 1, 8>(x, a, t, K, R, r0), r0 += 8;
#endif
  // the rest (all of it without AVX2)
  for (int64_t r = r0; r < R; ++r) t[r] = 0.f;
  for (int64_t k = 0; k < K && r0 < R; ++k) add_scaled_row<E>(x[k], a + k * R, t, r0, R);
}

// Prefetches the cache lines of bytes [from, from + n) past p. A hint: it never faults, even past an
// array's end, and the address is formed as an integer so that no pointer leaves its array. Locality 3 into L1,
// 2 into L2 (and beyond: for lines wanted after other work that streams through L1).
template <int Locality = 3>
inline void prefetch_lines(const void* p, size_t from, size_t n) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + from;
  for (size_t o = 0; o < n; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + o), 0, Locality);
}

constexpr int64_t kColumnBlock = 64;  // columns of B per pass down its rows: 8 vectors of 8 accumulators

// y[n0:n1] += t[0:r] @ b[:, n0:n1], b (r, ldb) row-major. Each block of 64 columns walks down the
// r rows, one short strided stream that the hardware prefetcher barely starts on, so each row also
// prefetches its columns two blocks ahead.
template <class E>
void t_times_b(const float* t, const typename E::T* b, float* y, int64_t r, int64_t ldb, int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(LE_AVX2)
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
#endif
  // the rest (all of it without AVX2)
  for (int64_t i = 0; i < r && n < n1; ++i) add_scaled_row<E>(t[i], b + i * ldb, y, n, n1);
}

constexpr int64_t kColumnsPerTask = 128;  // of B, per thread-pool task
constexpr int64_t kMinWorkToThread = 16384;  // multiply-adds of the B product below which one thread does it all

// -- MatMulQ4: the int4 base projection itself (kernel v4) ------------------------------------------------
// y (M, N) = x (M, K) @ W_hat.T with W_hat[n, k] = (q[n, k] - 8) * scale[n, b] + offset[n, b], b = k / 32, in
// one stream per node: `packed` (G, nb, 320) uint8, G = ceil(N / 16) groups of 16 output columns; per group
// and block of 32 along K (K zero-padded to nb * 32), 256 bytes of codes then 16 float16 scales and 16
// float16 offsets. The codes are 4 vectors of 64 bytes; in vector v, byte 4 j + i holds column 16 g + j's
// code at k = 8 v + i (low nibble) and 8 v + 4 + i (high nibble), so that one lane of a 512-bit register
// is one column's 4 consecutive codes: u8 x s8 dot products (VNNI's vpdpbusd, AVX2's maddubs) against
// x's int8 codes, with no horizontal sums. x is quantized per block of 32, symmetric int8 (d = max|x| / 127),
// as MatMulNBits does at accuracy level 4; the offsets multiply x's exact block sums. lora-edge's exporter
// writes this layout (lora_edge.quant.pack_q4). Columns past N (padding) have zero scales and offsets.
constexpr int64_t kQ4Block = 32, kQ4Group = 16, kQ4Bytes = 320, kQ4Codes = 256;

// x's rows quantized for MatMulQ4: codes (M, nb * 32), and per block d (the scale), 8 * d * sum(codes)
// (the implied zero point's share) and the exact float sum.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, zero_share, sums;
  std::vector<int32_t> qsum;  // the codes' sum per block
};

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t nb, QuantizedRows& out) {
  const int64_t kp = nb * kQ4Block;
  out.q.resize((size_t)(M * kp));
  out.d.resize((size_t)(M * nb)), out.zero_share.resize((size_t)(M * nb)), out.sums.resize((size_t)(M * nb));
  out.qsum.resize((size_t)(M * nb));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kQ4Block;
      const int64_t n = std::min(kQ4Block, K - b * kQ4Block);
      float peak = 0.f, sum = 0.f;
      for (int64_t k = 0; k < n; ++k) peak = std::max(peak, std::fabs(xb[k])), sum += xb[k];
      const float d = peak / 127.f, inv = peak > 0.f ? 127.f / peak : 0.f;
      int8_t* qb = out.q.data() + m * kp + b * kQ4Block;
      int32_t qsum = 0;
      for (int64_t k = 0; k < n; ++k) qb[k] = (int8_t)std::nearbyint(xb[k] * inv), qsum += qb[k];
      std::memset(qb + n, 0, (size_t)(kQ4Block - n));  // K's padding
      const size_t i = (size_t)(m * nb + b);
      out.d[i] = d, out.zero_share[i] = 8.f * d * (float)qsum, out.sums[i] = sum, out.qsum[i] = qsum;
    }
}

struct Q4Job {
  const uint8_t* w;  // (G, nb, 320)
  const QuantizedRows* x;
  float* y;  // (M, N): the products are added onto it
  int64_t M, N, nb, G;
};

// The stream runs ahead of the hardware prefetcher, which stops at each 4 KB page: records 16 blocks ahead
// (5 KB) into L1 and 64 blocks ahead (20 KB) into L2. Measured on 66 MB of synthetic layers at 1 thread:
// without it 0.66x MatMulNBits' speed, L1 alone 1.0x, both 1.25x.
// (Addresses formed as integers, as in prefetch_lines: past the last record they point nowhere.)
inline void q4_prefetch(const uint8_t* p) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  for (int o = 0; o < kQ4Bytes; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + 16 * kQ4Bytes + o), 0, 3);
  for (int o = 0; o < kQ4Bytes; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + 64 * kQ4Bytes + o), 0, 2);
}

constexpr int64_t kQ4Rows = 4;  // rows of x per pass over a group's weights (a prompt pass reuses them from L1)

// y[m, cols of group g] += the product, for rows m0..m0+rows-1 (a constant, so that the rows' loops unroll).
template <int rows>
void q4_group_rows(const Q4Job& j, int64_t g, int64_t m0) {
  const int64_t kp = j.nb * kQ4Block, c0 = g * kQ4Group, width = std::min(kQ4Group, j.N - c0);
  const uint8_t* p = j.w + g * j.nb * kQ4Bytes;
  const int8_t* xq = j.x->q.data() + m0 * kp;
  const size_t st = (size_t)(m0 * j.nb);
  const float *d = j.x->d.data() + st, *zs = j.x->zero_share.data() + st, *bs = j.x->sums.data() + st;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[rows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < j.nb; ++b, p += kQ4Bytes) {
    q4_prefetch(p);
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
    const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + kQ4Codes + 32)));
    for (int r = 0; r < rows; ++r) {
      const size_t i = (size_t)(r * j.nb + b);
      const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(d[i]), _mm512_set1_ps(zs[i]));
      acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(bs[i]), _mm512_fmadd_ps(s, t, acc[r]));
    }
  }
  const __mmask16 keep = (__mmask16)((1u << width) - 1u);
  for (int r = 0; r < rows; ++r) {
    float* y = j.y + (m0 + r) * j.N + c0;
    _mm512_mask_storeu_ps(y, keep, _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(keep, y)));
  }
#elif defined(LE_AVX2)
  // the same over two halves of 8 columns: u8 x s8 pairs (maddubs, at most 2 * 15 * 127: no saturation)
  // summed to int32 (madd with ones)
  __m256 acc[rows][2];
  for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < j.nb; ++b, p += kQ4Bytes) {
    q4_prefetch(p);
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
      const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + kQ4Codes + 32 + 16 * h)));
      for (int r = 0; r < rows; ++r) {
        const size_t i = (size_t)(r * j.nb + b);
        const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(d[i]), _mm256_set1_ps(zs[i]));
        acc[r][h] = _mm256_fmadd_ps(o, _mm256_set1_ps(bs[i]), _mm256_fmadd_ps(s, t, acc[r][h]));
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    float out[kQ4Group];
    _mm256_storeu_ps(out, acc[r][0]), _mm256_storeu_ps(out + 8, acc[r][1]);
    float* y = j.y + (m0 + r) * j.N + c0;
    for (int64_t c = 0; c < width; ++c) y[c] += out[c];
  }
#else
  float acc[rows][kQ4Group] = {};
  for (int64_t b = 0; b < j.nb; ++b, p += kQ4Bytes)
    for (int64_t c = 0; c < width; ++c) {
      const float s = half_to_float((uint16_t)(p[kQ4Codes + 2 * c] | p[kQ4Codes + 2 * c + 1] << 8));
      const float o = half_to_float((uint16_t)(p[kQ4Codes + 32 + 2 * c] | p[kQ4Codes + 33 + 2 * c] << 8));
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
#endif
}

// y[:, groups g0..g1-1's columns] += the product: each group's weights serve all rows (tiles of 4) from cache.
void q4_groups(const Q4Job& j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < std::min(g1, j.G); ++g) {
    int64_t m = 0;
    for (; m + kQ4Rows <= j.M; m += kQ4Rows) q4_group_rows<kQ4Rows>(j, g, m);
    switch (j.M - m) {
      case 3: q4_group_rows<3>(j, g, m); break;
      case 2: q4_group_rows<2>(j, g, m); break;
      case 1: q4_group_rows<1>(j, g, m); break;
      default: break;
    }
  }
}

constexpr int64_t kQ4GroupsPerTask = 4;  // 64 columns per thread-pool task of a projection alone

void run_q4_task(void* data, size_t index) {
  q4_groups(*static_cast<const Q4Job*>(data), (int64_t)index * kQ4GroupsPerTask, ((int64_t)index + 1) * kQ4GroupsPerTask);
}

// y (M, N) += the whole product, over the session's threads.
void run_q4(Ort::KernelContext& ctx, Q4Job& job) {
  const int64_t tasks = (job.G + kQ4GroupsPerTask - 1) / kQ4GroupsPerTask;
  if (tasks == 1) {
    run_q4_task(&job, 0);
  } else {
    ctx.ParallelFor(run_q4_task, (size_t)tasks, 0, &job);
  }
}

// The packed weight (checked against K and N) and x's quantized rows, for a product onto y.
Q4Job q4_job(const Ort::ConstValue& packed, const float* x, QuantizedRows& qx, float* y, int64_t M, int64_t K, int64_t N,
             const char* op) {
  auto ws = packed.GetTensorTypeAndShapeInfo().GetShape();
  const int64_t nb = (K + kQ4Block - 1) / kQ4Block, G = (N + kQ4Group - 1) / kQ4Group;
  if (ws.size() != 3 || ws[0] != G || ws[1] != nb || ws[2] != kQ4Bytes)
    ORT_CXX_API_THROW(std::string(op) + ": packed must be (ceil(N / 16), ceil(K / 32), 320)", ORT_INVALID_ARGUMENT);
  quantize_rows(x, M, K, nb, qx);
  return Q4Job{static_cast<const uint8_t*>(packed.GetTensorRawData()), &qx, y, M, N, nb, G};
}

// -- int8 A and B in VNNI order (kernel v5, "q8x") ------------------------------------------------------------
// LoraDeltaQ8's A and B may come as 3-D / 4-D int8 tensors in the order of u8 x s8 dot products of 4 (VNNI's
// vpdpbusd): A (Kp / 4, R, 4), byte [q, r, i] the code of A[4 q + i, r] XOR 0x80 (the code + 128 as a u8),
// Kp = ceil(K / 32) * 32 (padding rows code 0); B (chunks, r / 4, c, 4), byte [j, q, n, i] the code of chunk j's
// B[4 q + i, n] XOR 0x80, r a multiple of 4 and c of 16. Scales as for the 2-D layout. One 512-bit register
// is then 16 ranks (or columns) x 4 products, so 64 multiply-adds are one instruction, against 24 for the
// float path: at batch 1 the float path's instructions, not its bytes, were the branch's cost (int8 and
// float16 A/B measured the same). x is quantized per block of 32 as for MatMulQ4 (the same codes when the
// node runs its int4 base), x @ A's ranks per chunk to int8 (one scale per chunk and row) for the B product.
// Each path below computes exact integer dot products of the signed codes.
inline int8_t unbias(uint8_t v) { return (int8_t)(v ^ 0x80u); }

constexpr int64_t kQ8xAhead = 4;  // blocks of A's rows prefetched ahead of the x @ A loop

// t[0:R] = sum over blocks b of d_b * (xq_b . A_b) for one row, A in the q8x order, R a multiple of 4.
void x_times_a_q8x(const int8_t* xq, const float* d, const int32_t* qsum, const uint8_t* a, float* t, int64_t nb, int64_t R) {
  int64_t r0 = 0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
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
#elif defined(LE_AVX2)
  // 8 ranks per vector: signed pairs through maddubs with the sign trick (|a| x sign(x, a): at most
  // 2 * 127 * 127, no saturation), summed to int32 by madd with ones
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
#endif
  (void)qsum;
  for (int64_t r = r0; r < R; ++r) {  // the rest (all of it without AVX2)
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t dot = 0;
      for (int64_t k = 0; k < kQ4Block; ++k) dot += xq[b * kQ4Block + k] * unbias(a[((b * 8 + k / 4) * R + r) * 4 + k % 4]);
      acc += d[b] * (float)dot;
    }
    t[r] = acc;
  }
}

// y[n0:n1] += dt * (tq . B[:, n]) for one row and chunk: tq (4 rq) int8 ranks, B the chunk's (rq, c, 4) q8x bytes,
// n0 and n1 multiples of 16.
void t_times_b_q8x(const int8_t* tq, float dt, int32_t tsum, const uint8_t* b, float* y, int64_t rq, int64_t c, int64_t n0,
                   int64_t n1) {
  int64_t n = n0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
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
#elif defined(LE_AVX2)
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
#endif
  (void)tsum;
  for (; n < n1; ++n) {  // the rest (all of it without AVX2)
    int32_t dot = 0;
    for (int64_t i = 0; i < 4 * rq; ++i) dot += tq[i] * unbias(b[((i / 4) * c + n) * 4 + i % 4]);
    y[n] += dt * (float)dot;
  }
}

// A row's ranks for the q8x B product: per chunk, t' (r floats) to int8 codes with one scale (max |t'| / 127),
// and the codes' sum (the u8 codes' +128 correction).
struct QuantizedRanks {
  std::vector<int8_t> q;  // (M, chunks, r)
  std::vector<float> d;  // (M, chunks)
  std::vector<int32_t> sum;  // (M, chunks)
};

void quantize_ranks(const float* t, int64_t rows, int64_t r, QuantizedRanks& out) {
  out.q.resize((size_t)(rows * r)), out.d.resize((size_t)rows), out.sum.resize((size_t)rows);
  for (int64_t i = 0; i < rows; ++i) {
    const float* ti = t + i * r;
    float peak = 0.f;
    for (int64_t k = 0; k < r; ++k) peak = std::max(peak, std::fabs(ti[k]));
    const float inv = peak > 0.f ? 127.f / peak : 0.f;
    int32_t s = 0;
    for (int64_t k = 0; k < r; ++k) {
      const int8_t v = (int8_t)std::nearbyint(ti[k] * inv);
      out.q[(size_t)(i * r + k)] = v, s += v;
    }
    out.d[(size_t)i] = peak / 127.f, out.sum[(size_t)i] = s;
  }
}

// -- the w8a8 blob (kernel v5) -------------------------------------------------------------------------------------
// A w8a8 package's adapter is one int8 tensor for all its q8x branches, so that a run binds one input where it bound
// four per branch (ONNX Runtime's per-run cost of a bound input, ~0.6 us each, was 0.3 ms of a token's 0.6 ms of branch
// with 480). Layout (lora_edge.native.w8a8_blob): int64 n, then per slot 8 int64 (a_off, sa_off, b_off, sb_off, R,
// chunks, r, c: byte offsets from the blob's start, and the sizes of the slot's q8x A (ceil(K / 32) * 8, R, 4) and B
// (chunks, r / 4, c, 4), float32 scales A_scale (R) and B_scale (chunks, r)); R = r = 0 for a branch the adapter
// leaves alone (chunks and c still give the node's output width). LoraDeltaQ8 takes the blob as its A (1-D), with
// attribute `slot`, and no A_scale, B, B_scale.
struct BlobSlot {
  const uint8_t* a;
  const float* sa;
  const uint8_t* b;
  const float* sb;
  int64_t R, chunks, r, c;
};

BlobSlot blob_slot(const Ort::ConstValue& blob, int64_t slot, int64_t nb) {
  const auto size = (int64_t)blob.GetTensorTypeAndShapeInfo().GetElementCount();
  const uint8_t* p = static_cast<const uint8_t*>(blob.GetTensorRawData());
  int64_t n = 0, f[8];
  if (size >= 8) std::memcpy(&n, p, 8);
  if (slot < 0 || n <= slot || (size - 8) / 64 < n)
    ORT_CXX_API_THROW("LoraDeltaQ8: the w8a8 blob has no part for this node's slot (an adapter of another package?)",
                      ORT_INVALID_ARGUMENT);
  std::memcpy(f, p + 8 + 64 * slot, sizeof(f));
  const int64_t R = f[4], chunks = f[5], r = f[6], c = f[7];
  auto fits = [&](int64_t off, int64_t bytes, int64_t align) { return off >= 0 && off % align == 0 && bytes <= size - off; };
  const bool dims = R >= 0 && chunks >= 0 && r >= 0 && c >= 0 && R % 4 == 0 && r % 4 == 0 && c % kQ4Group == 0 &&
                    R < (1 << 20) && chunks < (1 << 20) && r < (1 << 20) && c < (1 << 24);
  if (!dims || !fits(f[0], nb * kQ4Block * R, 1) || !fits(f[1], 4 * R, 4) || !fits(f[2], chunks * r * c, 1) ||
      !fits(f[3], 4 * chunks * r, 4))
    ORT_CXX_API_THROW("LoraDeltaQ8: the w8a8 blob's part for this node does not fit its input width or the blob",
                      ORT_INVALID_ARGUMENT);
  return BlobSlot{p + f[0], reinterpret_cast<const float*>(p + f[1]), p + f[2], reinterpret_cast<const float*>(p + f[3]),
                  R, chunks, r, c};
}

// Per-thread scratch of a node's Compute, kept from call to call: a decode step would otherwise allocate a dozen
// small buffers per node (measured: ~1 us of a q8x node's ~4). The node's thread-pool tasks read it through
// their job while Compute waits for them.
struct Workspace {
  QuantizedRows x;
  QuantizedRanks ranks;
  std::vector<int64_t> first;
};

Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

// The float16 offsets' rows of a y += blocksum(x) @ offsets: a second product over the same columns,
// run inside the B product's tasks so that a node with both pays for one pass and one ParallelFor.
struct OffsetRows {
  const float* s = nullptr;  // (M, nb) block sums
  const uint16_t* o = nullptr;  // (nb, N)
  int64_t nb = 0;
};

template <class E>
struct Job {
  const float* t;  // (M, ldt): row m's ranks for chunk j start at t + m * ldt + first[j]
  const typename E::T* b;
  float* y;  // (M, chunks * c)
  const int64_t* first;
  int64_t M, ldt, r, c, chunks, tasks_per_chunk;
  OffsetRows off;  // optional
  const Q4Job* q4 = nullptr;  // optional: the int4 base's product over the same columns (c a multiple of 16)
  const QuantizedRanks* ranks = nullptr;  // q8x: row m's chunk j ranks at (m * chunks + j) * r; b then the q8x bytes
};

constexpr int64_t kRowsPerTask = 8;  // of x, per thread-pool task of the A product (prompt passes)

template <class E>
struct RowJob {
  const float* x;
  const typename E::T* a;
  float* t;  // (M, R)
  int64_t M, K, R;
  const QuantizedRows* q8x = nullptr;  // x's codes when A is in the q8x order
};

template <class E>
void run_rows(void* data, size_t index) {
  const RowJob<E>& j = *static_cast<const RowJob<E>*>(data);
  for (int64_t m = (int64_t)index * kRowsPerTask; m < std::min(j.M, ((int64_t)index + 1) * kRowsPerTask); ++m)
    if (j.q8x != nullptr) {
      const int64_t nb = (j.K + kQ4Block - 1) / kQ4Block;
      const size_t at = (size_t)(m * nb);
      x_times_a_q8x(j.q8x->q.data() + at * kQ4Block, j.q8x->d.data() + at, j.q8x->qsum.data() + at,
                    reinterpret_cast<const uint8_t*>(j.a), j.t + m * j.R, nb, j.R);
    } else {
      x_times_a<E>(j.x + m * j.K, j.a, j.t + m * j.R, j.K, j.R);
    }
}

template <class E>
void run_task(void* data, size_t index) {
  const Job<E>& j = *static_cast<const Job<E>*>(data);
  int64_t chunk = (int64_t)index / j.tasks_per_chunk, part = (int64_t)index % j.tasks_per_chunk;
  int64_t n0 = part * kColumnsPerTask, n1 = std::min(j.c, n0 + kColumnsPerTask);
  const typename E::T* b = j.b + chunk * j.r * j.c;
  int64_t width = j.chunks * j.c;
  if (j.q4 != nullptr) {
    // B's bytes for these columns are cold: asked for into L2 now, they arrive while the base's part streams
    if (j.ranks != nullptr)
      for (int64_t q = 0; q < j.r / 4; ++q) prefetch_lines<2>(b + (q * j.c + n0) * 4, 0, (size_t)(n1 - n0) * 4);
    q4_groups(*j.q4, (chunk * j.c + n0) / kQ4Group, (chunk * j.c + n1 + kQ4Group - 1) / kQ4Group);
  }
  for (int64_t m = 0; m < j.M; ++m) {
    float* y = j.y + m * width + chunk * j.c;
    if (j.off.o != nullptr) t_times_b<F16>(j.off.s + m * j.off.nb, j.off.o + chunk * j.c, y, j.off.nb, width, n0, n1);
    if (j.ranks != nullptr) {
      const size_t row = (size_t)(m * j.chunks + chunk);
      t_times_b_q8x(j.ranks->q.data() + row * j.r, j.ranks->d[row], j.ranks->sum[row], reinterpret_cast<const uint8_t*>(b), y,
                    j.r / 4, j.c, n0, n1);
    } else {
      t_times_b<E>(j.t + m * j.ldt + j.first[chunk], b, y, j.r, j.c, n0, n1);
    }
  }
}

// Scratch memory: on the stack up to N elements (a decode step's x @ A), else on the heap.
template <class T, size_t N>
struct Scratch {
  T local[N];
  std::vector<T> heap;
  T* get(size_t n) {
    if (n <= N) return local;
    heap.resize(n);
    return heap.data();
  }
};

// y (M, chunks * c) += the chunks' t @ B: on this thread when small (a decode step's products are
// a few µs, about what a ParallelFor costs), else by column tasks over the session's threads.
template <class E>
void run_b_product(Ort::KernelContext& ctx, Job<E>& job) {
  size_t tasks = (size_t)(job.chunks * job.tasks_per_chunk);
  if ((job.q4 == nullptr && job.M * job.chunks * (job.r + job.off.nb) * job.c < kMinWorkToThread) || tasks == 1) {
    for (size_t i = 0; i < tasks; ++i) run_task<E>(&job, i);
  } else {
    ctx.ParallelFor(run_task<E>, tasks, 0, &job);
  }
}

// s[0:nb] = the sums of x[0:K] over blocks of `block` (the last one may be short).
inline void block_sums(const float* x, float* s, int64_t K, int64_t nb, int64_t block) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * block, k1 = std::min(K, k0 + block);
    int64_t k = k0;
    float sum = 0.f;
#if defined(LE_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= k1; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + k));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; k < k1; ++k) sum += x[k];
    s[b] = sum;
  }
}

// The rows of y (M, N) += blocksum(x) @ offsets: x (M, K) float32, offsets (nb, N) float16 (a tensor of
// the node's), checked; x's block sums go to s_mem. nb is 0 when there is nothing to add.
using BlockSums = Scratch<float, 1024>;  // a decode step's block sums stay on the stack

OffsetRows block_offset_rows(const Ort::ConstValue& offsets, const float* x, BlockSums& s_mem, int64_t M,
                             int64_t K, int64_t N, int64_t block, const char* op) {
  auto os = offsets.GetTensorTypeAndShapeInfo().GetShape();
  const int64_t nb = block > 0 ? (K + block - 1) / block : 0;
  if (block <= 0 || os.size() != 2 || os[0] != nb || os[1] != N)
    ORT_CXX_API_THROW(std::string(op) + ": offsets must be (ceil(K / block), N) with block > 0", ORT_INVALID_ARGUMENT);
  OffsetRows rows;
  if (M == 0 || N == 0 || nb == 0) return rows;
  float* s = s_mem.get((size_t)(M * nb));
  for (int64_t m = 0; m < M; ++m) block_sums(x + m * K, s + m * nb, K, nb, block);
  rows.s = s, rows.o = static_cast<const uint16_t*>(offsets.GetTensorRawData()), rows.nb = nb;
  return rows;
}

// y (M, N) += the offsets' product alone (no LoRA ranks to share its pass).
void add_offset_rows(Ort::KernelContext& ctx, const OffsetRows& rows, float* y, int64_t M, int64_t N) {
  if (rows.nb == 0) return;
  const int64_t first = 0;
  Job<F16> job{rows.s, rows.o, y, &first, M, rows.nb, rows.nb, N, 1, (N + kColumnsPerTask - 1) / kColumnsPerTask};
  run_b_product<F16>(ctx, job);
}

int64_t int_attribute(const OrtKernelInfo* info, const char* name, int64_t otherwise) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return otherwise;
  }
}

// LoraDelta (E = F16, no scales) and LoraDeltaQ8 (E = I8; inputs x, A, A_scale, B, B_scale); then
// the optional base, extra, offsets and packed (v4: the int4 base projection itself, MatMulQ4's weight, run
// in the B product's tasks over the same columns: one node and one pass for a projection and its adapter).
template <class E, bool Scaled>
struct LoraDeltaKernel {
  static constexpr size_t kB = Scaled ? 3 : 2;  // B's input index
  static constexpr size_t kBase = kB + (Scaled ? 2 : 1);  // the optional addends' first index
  static constexpr size_t kOptional = 4;  // base, extra, offsets, packed
  static constexpr size_t kOffsets = kBase + 2, kPacked = kBase + 3;
  std::vector<int64_t> chunk_modules;
  int64_t offset_block, slot;  // slot: this node's part of a w8a8 blob

  LoraDeltaKernel(const OrtApi& api, const OrtKernelInfo* info)
      : offset_block(int_attribute(info, "offset_block", 0)), slot(int_attribute(info, "slot", -1)) {
    Ort::ConstKernelInfo ki(info);
    try {
      chunk_modules = ki.GetAttributes<int64_t>("chunk_modules");
    } catch (const Ort::Exception&) {
      chunk_modules.clear();  // a 2-D B: one module, one chunk
    }
    (void)api;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0), a = ctx.GetInput(1);
    auto xs = x.GetTensorTypeAndShapeInfo().GetShape(), as = a.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty()) ORT_CXX_API_THROW("LoraDelta: x must be (..., K)", ORT_INVALID_ARGUMENT);
    const int64_t K = xs.back(), nb = (K + kQ4Block - 1) / kQ4Block;
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
    const void *a_raw, *b_raw;
    const float *sa = nullptr, *sb = nullptr;
    int64_t R, chunks, r, c;
    bool q8x, one_chunk;  // q8x: int8 A and B in VNNI order (v5)
    if (Scaled && as.size() == 1) {  // the adapter's w8a8 blob: this node's A, B and scales are its slot `slot`
      const BlobSlot part = blob_slot(a, slot, nb);
      a_raw = part.a, sa = part.sa, b_raw = part.b, sb = part.sb;
      R = part.R, chunks = part.chunks, r = part.r, c = part.c;
      q8x = true, one_chunk = chunk_modules.empty();
    } else {
      auto b = ctx.GetInput(kB);
      auto bs = b.GetTensorTypeAndShapeInfo().GetShape();
      q8x = Scaled && as.size() == 3;
      if ((as.size() != 2 && !q8x) || (q8x ? bs.size() != 4 : bs.size() != 2 && bs.size() != 3))
        ORT_CXX_API_THROW("LoraDelta: x must be (..., K), A (K, R), B (R, N) or (chunks, r, c) (LoraDeltaQ8's q8x order: "
                          "A (ceil(K / 32) * 8, R, 4), B (chunks, r / 4, c, 4); or A the w8a8 blob)", ORT_INVALID_ARGUMENT);
      R = as[1];
      if (q8x ? as[0] != nb * 8 || as[2] != 4 || R % 4 != 0 : as[0] != K)
        ORT_CXX_API_THROW("LoraDelta: A's rows differ from x's last dim", ORT_INVALID_ARGUMENT);
      chunks = bs.size() == 2 ? 1 : bs[0], r = bs.size() == 2 ? bs[0] : bs[1], c = bs.size() == 2 ? bs[1] : bs[2];
      if (q8x) {
        r *= 4;
        if (bs[3] != 4 || c % kQ4Group != 0)
          ORT_CXX_API_THROW("LoraDeltaQ8: a q8x B must be (chunks, r / 4, c, 4) with c a multiple of 16", ORT_INVALID_ARGUMENT);
      }
      one_chunk = bs.size() == 2 || (q8x && chunk_modules.empty());
      a_raw = a.GetTensorRawData(), b_raw = b.GetTensorRawData();
      if (Scaled) {
        auto sav = ctx.GetInput(2), sbv = ctx.GetInput(4);
        if (static_cast<const OrtValue*>(sav) == nullptr || static_cast<const OrtValue*>(sbv) == nullptr)
          ORT_CXX_API_THROW("LoraDeltaQ8: A_scale and B_scale are needed unless A is the w8a8 blob", ORT_INVALID_ARGUMENT);
        if ((int64_t)sav.GetTensorTypeAndShapeInfo().GetElementCount() != R)
          ORT_CXX_API_THROW("LoraDeltaQ8: A_scale must hold one scale per column of A", ORT_INVALID_ARGUMENT);
        if ((int64_t)sbv.GetTensorTypeAndShapeInfo().GetElementCount() != chunks * r)
          ORT_CXX_API_THROW("LoraDeltaQ8: B_scale must hold one scale per row of B", ORT_INVALID_ARGUMENT);
        sa = sav.GetTensorData<float>(), sb = sbv.GetTensorData<float>();
      }
    }
    Workspace& ws = workspace();
    std::vector<int64_t>& first = ws.first;  // per chunk: where its module's ranks start in a row of x @ A
    first.clear();
    if (one_chunk) {
      if (r != R || chunks != 1) ORT_CXX_API_THROW("LoraDelta: B's rows differ from A's columns", ORT_INVALID_ARGUMENT);
      first.push_back(0);
    } else {
      if ((int64_t)chunk_modules.size() != chunks)
        ORT_CXX_API_THROW("LoraDelta: B's chunk count differs from chunk_modules", ORT_INVALID_ARGUMENT);
      for (int64_t mod : chunk_modules) {
        if (mod < 0 || (mod + 1) * r > R) ORT_CXX_API_THROW("LoraDelta: a chunk reads ranks A does not have", ORT_INVALID_ARGUMENT);
        first.push_back(mod * r);
      }
    }
    std::vector<int64_t>& ys = xs;  // the output's shape: x's, with B's width last
    ys.back() = chunks * c;
    auto out = ctx.GetOutput(0, ys);
    float* y = out.GetTensorMutableData<float>();
    const int64_t size = M * chunks * c;
    if (size == 0) return;
    // y = base + extra (or zeros): the delta is accumulated onto it
    const float* addends[2] = {nullptr, nullptr};
    const size_t n_inputs = ctx.GetInputCount();
    for (size_t i = 0; i < 2 && kBase + i < n_inputs; ++i) {
      auto v = ctx.GetInput(kBase + i);
      if (static_cast<const OrtValue*>(v) == nullptr) continue;  // an absent optional input
      if ((int64_t)v.GetTensorTypeAndShapeInfo().GetElementCount() != size)
        ORT_CXX_API_THROW("LoraDelta: base and extra must have the output's shape", ORT_INVALID_ARGUMENT);
      addends[i] = v.GetTensorData<float>();
    }
    if (addends[0] == nullptr) std::swap(addends[0], addends[1]);
    if (addends[0] == nullptr) {
      std::memset(y, 0, sizeof(float) * size);
    } else {
      std::memcpy(y, addends[0], sizeof(float) * size);
    }
    if (addends[1] != nullptr)
      for (int64_t i = 0; i < size; ++i) y[i] += addends[1][i];
    const float* xp = x.GetTensorData<float>();
    OffsetRows off;  // the base's float-offset correction, run in the B product's pass
    BlockSums s_mem;
    if (kOffsets < n_inputs) {
      auto offsets = ctx.GetInput(kOffsets);
      if (static_cast<const OrtValue*>(offsets) != nullptr)
        off = block_offset_rows(offsets, xp, s_mem, M, K, chunks * c, offset_block, "LoraDelta");
    }
    QuantizedRows& qx = ws.x;  // x's int8 codes: for the int4 base and a q8x x @ A
    Q4Job q4{};
    bool fuse_q4 = false, quantized = false;
    if (kPacked < n_inputs) {
      auto packed = ctx.GetInput(kPacked);
      if (static_cast<const OrtValue*>(packed) != nullptr) {
        if (off.nb != 0) ORT_CXX_API_THROW("LoraDelta: offsets and packed are exclusive (packed holds its offsets)", ORT_INVALID_ARGUMENT);
        q4 = q4_job(packed, xp, qx, y, M, K, chunks * c, "LoraDelta");
        fuse_q4 = quantized = true;
      }
    }
    if (fuse_q4 && (R == 0 || r == 0 || c % kQ4Group != 0)) run_q4(ctx, q4), fuse_q4 = false;  // a pass of its own
    if (R == 0 || r == 0) return add_offset_rows(ctx, off, y, M, chunks * c);  // no adapter bound: just the sums
    using T = typename E::T;
    const T* ap = static_cast<const T*>(a_raw);
    const T* bp = static_cast<const T*>(b_raw);
    Scratch<float, 1024> t_mem, scaled_mem;
    float* t = t_mem.get((size_t)(M * R));
    if (q8x && !quantized) quantize_rows(xp, M, K, nb, qx);
    RowJob<E> rows{xp, ap, t, M, K, R, q8x ? &qx : nullptr};
    size_t row_tasks = (size_t)((M + kRowsPerTask - 1) / kRowsPerTask);
    if (row_tasks > 1 && M * K * R >= 4 * kMinWorkToThread) {  // a prompt pass: rows over the threads
      ctx.ParallelFor(run_rows<E>, row_tasks, 0, &rows);
    } else {  // decode (one row): A is read once, on this thread
      for (size_t i = 0; i < row_tasks; ++i) run_rows<E>(&rows, i);
    }
    const float* tp = t;
    int64_t ldt = R;
    if (Scaled) {  // per chunk, its module's ranks times A's column scales and the chunk's B row scales
      float* scaled = scaled_mem.get((size_t)(M * chunks * r));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < chunks; ++j)
          for (int64_t i = 0; i < r; ++i)
            scaled[(m * chunks + j) * r + i] = t[m * R + first[j] + i] * sa[first[j] + i] * sb[j * r + i];
      for (int64_t j = 0; j < chunks; ++j) first[j] = j * r;
      tp = scaled, ldt = chunks * r;
    }
    QuantizedRanks& ranks = ws.ranks;
    if (q8x) quantize_ranks(tp, M * chunks, r, ranks);
    Job<E> job{tp, bp, y, first.data(), M, ldt, r, c, chunks, (c + kColumnsPerTask - 1) / kColumnsPerTask, off, fuse_q4 ? &q4 : nullptr,
               q8x ? &ranks : nullptr};
    run_b_product<E>(ctx, job);
  }
};

// BlockOffset(x, offsets, base): base + blocksum(x) @ offsets.
struct BlockOffsetKernel {
  int64_t block;

  BlockOffsetKernel(const OrtApi&, const OrtKernelInfo* info) : block(int_attribute(info, "block", 0)) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0), offsets = ctx.GetInput(1), base = ctx.GetInput(2);
    auto xs = x.GetTensorTypeAndShapeInfo().GetShape(), ys = base.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty() || ys.size() != xs.size())
      ORT_CXX_API_THROW("BlockOffset: x must be (..., K) and base (..., N) with the same leading dims", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) {
      if (xs[i] != ys[i]) ORT_CXX_API_THROW("BlockOffset: x and base differ in their leading dims", ORT_INVALID_ARGUMENT);
      M *= xs[i];
    }
    const int64_t K = xs.back(), N = ys.back();
    auto out = ctx.GetOutput(0, ys);
    float* y = out.GetTensorMutableData<float>();
    if (M * N == 0) return;
    std::memcpy(y, base.GetTensorData<float>(), sizeof(float) * M * N);
    BlockSums s_mem;
    add_offset_rows(ctx, block_offset_rows(offsets, x.GetTensorData<float>(), s_mem, M, K, N, block, "BlockOffset"), y, M, N);
  }
};

struct MatMulQ4Kernel {
  int64_t K, N;

  MatMulQ4Kernel(const OrtApi&, const OrtKernelInfo* info) : K(int_attribute(info, "K", 0)), N(int_attribute(info, "N", 0)) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0);
    auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty() || xs.back() != K || K <= 0 || N <= 0)
      ORT_CXX_API_THROW("MatMulQ4: x must be (..., K) with the node's K > 0 and N > 0", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
    std::vector<int64_t>& ys = xs;
    ys.back() = N;
    auto out = ctx.GetOutput(0, ys);
    float* y = out.GetTensorMutableData<float>();
    QuantizedRows& qx = workspace().x;
    Q4Job job = q4_job(ctx.GetInput(1), x.GetTensorData<float>(), qx, y, M, K, N, "MatMulQ4");
    if (M == 0) return;
    std::memset(y, 0, sizeof(float) * M * N);
    run_q4(ctx, job);
  }
};

using F16Kernel = LoraDeltaKernel<F16, false>;
using I8Kernel = LoraDeltaKernel<I8, true>;

// What every lora_edge operator declares alike: a CPU kernel with one float32 output.
template <class Op, class Kernel>
struct CpuOpBase : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

template <class Op, class Kernel>
struct DeltaOpBase : CpuOpBase<Op, Kernel> {
  size_t GetInputTypeCount() const { return Kernel::kBase + Kernel::kOptional; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= Kernel::kBase ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                              : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
};

struct LoraDeltaOp : DeltaOpBase<LoraDeltaOp, F16Kernel> {
  const char* GetName() const { return "LoraDelta"; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, A, B, base, extra, offsets, packed
    return i == 1 || i == 2 || i == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
           : i == 6                   ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

struct LoraDeltaQ8Op : DeltaOpBase<LoraDeltaQ8Op, I8Kernel> {
  const char* GetName() const { return "LoraDeltaQ8"; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {  // (A_scale, B, B_scale: none with a blob)
    return i >= 2 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, A, A_scale, B, B_scale, base, extra, offsets, packed
    return i == 1 || i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
           : i == 7         ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
           : i == 8         ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                            : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

struct MatMulQ4Op : CpuOpBase<MatMulQ4Op, MatMulQ4Kernel> {
  const char* GetName() const { return "MatMulQ4"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, packed
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

struct BlockOffsetOp : CpuOpBase<BlockOffsetOp, BlockOffsetKernel> {
  const char* GetName() const { return "BlockOffset"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, offsets, base
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

LoraDeltaOp the_op;
LoraDeltaQ8Op the_q8_op;
BlockOffsetOp the_offset_op;
MatMulQ4Op the_q4_op;
std::once_flag domain_once;
OrtCustomOpDomain* the_domain = nullptr;

}  // namespace

extern "C" {

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an ORT older than these headers: nothing registered, the session says so
  Ort::InitApi(api);
  OrtStatus* status = nullptr;
  std::call_once(domain_once, [&] {
    status = api->CreateCustomOpDomain("lora_edge", &the_domain);
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, &the_op);
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, &the_q8_op);
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, &the_offset_op);
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, &the_q4_op);
  });
  if (status != nullptr) return status;
  return api->AddCustomOpDomain(options, the_domain);
}

// The kernel's ABI version; the runtime compares it with what a package was exported for.
#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int lora_edge_kernel_version() { return 5; }

}  // extern "C"
