// lora-edge's native kernel: ONNX Runtime custom operators (CPU, domain "lora_edge") for a projection's LoRA
// branch and the int4 projection it rides on, in the layouts lora-edge's exporter writes.
//
// Why it exists: ONNX Runtime's CPU MatMul reads a branch's weights as float32 (twice the bytes of float16), and
// MLAS threads no GEMM under 64k multiply-adds, which every LoRA product at batch 1 is, so a branch ran on one core.
// These operators read float16 or int8 weights, run x @ A and t @ B in one node, add the delta onto the base
// projection's output in the same node (or compute that projection too, from the packed int4 layout) and split the
// B product's columns over the session's intra-op thread pool.
//
// Why it is shaped so: at batch 1 every weight is read once per token, mostly from beyond the caches, so the inner
// loops stream: they prefetch ahead of the hardware prefetcher, read int8 codes in the order of 4-wide u8 x s8 dot
// products (VNNI's vpdpbusd, AVX2's maddubs), and a decode step allocates nothing. The instruction set is chosen
// when the library is compiled (-march, "native" by default: the machine that runs the packages builds it).
//
// The files: one per operator (lora_delta.cc, lora_delta_q8.cc and their shared lora_delta.h; block_offset.cc;
// matmul_q4.cc), the B product's tasks (branch.h), the inner loops by instruction set (dot_avx512vnni.h, dot_avx2.h,
// dot_neon.h, dot_portable.h; dot.h picks among them), register.cc (the domain, the exported entry points) and
// contract.h (the mirror of lora_edge/native/contract.py).
#pragma once

// Every file includes ONNX Runtime's C++ API through here: its API pointer is set by RegisterCustomOps
// (Ort::InitApi), never by a static initializer, and every file must see the API declared alike.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// The instruction sets, from the compiler's target (-march). LE_AVX2: 8-wide float vectors, FMA and float16
// conversion, for every product. LE_AVX512VNNI: the int8 products (MatMulQ4, LoraDeltaQ8's q8x order) on 512-bit
// vpdpbusd; where it is defined it takes those products, and AVX2 the rest.
#if defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
#define LE_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LE_AVX512VNNI 1
#endif
#if defined(LE_AVX2) || defined(LE_AVX512VNNI)
#include <immintrin.h>
#endif
// LE_NEON: 64-bit ARM's AdvSIMD for the int8 products (dot_neon.h), with LE_NEON_DOTPROD where the target has SDOT
// (-march=armv8.2-a+dotprod and later; build.py picks it from the CPU's feature bits).
#if defined(__aarch64__) && defined(__ARM_NEON)
#define LE_NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define LE_NEON_DOTPROD 1
#endif
#endif

namespace lora_edge {

inline float half_to_float(uint16_t h) {
#if defined(LE_AVX2)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)  // ARM's half type (GCC before 13 has no _Float16 in C++): a hardware conversion
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return (float)f;
#elif defined(__FLT16_MAX__)  // the compiler's own half type (recent x86): a hardware conversion
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

// Prefetches the cache lines of bytes [from, from + n) past p. A hint: it never faults, even past an
// array's end, and the address is formed as an integer so that no pointer leaves its array. Locality 3 into L1,
// 2 into L2 (and beyond: for lines wanted after other work that streams through L1).
template <int Locality = 3>
inline void prefetch_lines(const void* p, size_t from, size_t n) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + from;
  for (size_t o = 0; o < n; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + o), 0, Locality);
}

// x's rows quantized for the int8 products (MatMulQ4, a q8x x @ A; quantize_rows, matmul_q4.cc): codes
// (M, nb * 32), and per block d (the scale), 8 * d * sum(codes) (the implied zero point's share) and the exact float sum.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, zero_share, sums;
  std::vector<int32_t> qsum;  // the codes' sum per block
};

// A row's ranks for the q8x B product (quantize_ranks, lora_delta_q8.cc): per chunk, t' (r floats) to int8 codes
// with one scale (max |t'| / 127), and the codes' sum (the u8 codes' +128 correction).
struct QuantizedRanks {
  std::vector<int8_t> q;  // (M, chunks, r)
  std::vector<float> d;  // (M, chunks)
  std::vector<int32_t> sum;  // (M, chunks)
};

// Per-thread scratch of a node's Compute, kept from call to call: a decode step would otherwise allocate a dozen
// small buffers per node (measured: ~1 us of a q8x node's ~4). The node's thread-pool tasks read it through
// their job while Compute waits for them.
struct Workspace {
  QuantizedRows x;
  QuantizedRanks ranks;
  std::vector<int64_t> first;
};

inline Workspace& workspace() {
  thread_local Workspace w;
  return w;
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

inline int64_t int_attribute(const OrtKernelInfo* info, const char* name, int64_t otherwise) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return otherwise;
  }
}

// A product's x (..., K) and its output (..., N): M, the rows (the product of x's leading dimensions), and y. Thrown
// unless x's last dimension is the node's K > 0 and N > 0.
inline float* product_output(Ort::KernelContext& ctx, const Ort::ConstValue& x, int64_t K, int64_t N, const char* op,
                             int64_t& M) {
  auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.empty() || shape.back() != K || K <= 0 || N <= 0)
    ORT_CXX_API_THROW(std::string(op) + ": x must be (..., K) with the node's K > 0 and N > 0", ORT_INVALID_ARGUMENT);
  M = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
  shape.back() = N;
  return ctx.GetOutput(0, shape).GetTensorMutableData<float>();
}

// Tasks 0..tasks-1 of fn(job, i): over the session's threads, or on this thread when there is only one.
inline void run_tasks(Ort::KernelContext& ctx, void (*fn)(void*, size_t), size_t tasks, void* job) {
  if (tasks == 1) {
    fn(job, 0);
  } else {
    ctx.ParallelFor(fn, tasks, 0, job);
  }
}

// What every lora_edge operator declares alike: a CPU kernel with one float32 output.
template <class Op, class Kernel>
struct CpuOpBase : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// The operators, one instance each, defined in their files and added to the domain by register.cc.
const OrtCustomOp* lora_delta_op();  // lora_delta.cc
const OrtCustomOp* lora_delta_q8_op();  // lora_delta_q8.cc
const OrtCustomOp* block_offset_op();  // block_offset.cc
const OrtCustomOp* matmul_q4_op();  // matmul_q4.cc
const OrtCustomOp* matmul_q8_op();  // matmul_q8.cc

}  // namespace lora_edge
