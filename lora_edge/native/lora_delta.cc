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
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
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

#if defined(LE_AVX2)
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// acc[v] += x[k] * A[k, r0 + 8v] over k, V vectors of 8 ranks, the k loop unrolled U times so
// that U * V independent FMA chains hide the FMA latency.
template <int V, int U>
void x_times_a_block(const float* x, const uint16_t* a, float* t, int64_t K, int64_t R, int64_t r0) {
  __m256 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      __m256 xv = _mm256_set1_ps(x[k + u]);
      const uint16_t* p = a + (k + u) * R + r0;
      for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(xv, load8(p + 8 * v), acc[u][v]);
    }
  for (; k < K; ++k) {
    __m256 xv = _mm256_set1_ps(x[k]);
    for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(xv, load8(a + k * R + r0 + 8 * v), acc[0][v]);
  }
  for (int v = 0; v < V; ++v) {
    __m256 s = acc[0][v];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][v]);
    _mm256_storeu_ps(t + r0 + 8 * v, s);
  }
}
#endif

// y[from:to] += s * row[from:to], row float16: the portable path of both products, in the order
// compilers vectorise (contiguous innermost)
inline void add_scaled_row(float s, const uint16_t* row, float* y, int64_t from, int64_t to) {
  for (int64_t j = from; j < to; ++j) y[j] += s * half_to_float(row[j]);
}

// t[0:R] = x[0:K] @ A (K, R), A row-major float16.
void x_times_a(const float* x, const uint16_t* a, float* t, int64_t K, int64_t R) {
  int64_t r0 = 0;
#if defined(LE_AVX2)
  for (; r0 + 32 <= R; r0 += 32) x_times_a_block<4, 2>(x, a, t, K, R, r0);
  if (R - r0 >= 24) x_times_a_block<3, 2>(x, a, t, K, R, r0), r0 += 24;
  else if (R - r0 >= 16) x_times_a_block<2, 4>(x, a, t, K, R, r0), r0 += 16;
  else if (R - r0 >= 8) x_times_a_block<1, 8>(x, a, t, K, R, r0), r0 += 8;
#endif
  // the rest (all of it without AVX2)
  for (int64_t r = r0; r < R; ++r) t[r] = 0.f;
  for (int64_t k = 0; k < K && r0 < R; ++k) add_scaled_row(x[k], a + k * R, t, r0, R);
}

// y[n0:n1] = t[0:r] @ b[:, n0:n1], b (r, ldb) row-major float16.
void t_times_b(const float* t, const uint16_t* b, float* y, int64_t r, int64_t ldb, int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(LE_AVX2)
  for (; n + 64 <= n1; n += 64) {
    __m256 c[8];
    for (int v = 0; v < 8; ++v) c[v] = _mm256_setzero_ps();
    const uint16_t* p = b + n;
    for (int64_t i = 0; i < r; ++i, p += ldb) {
      __m256 tv = _mm256_set1_ps(t[i]);
      for (int v = 0; v < 8; ++v) c[v] = _mm256_fmadd_ps(tv, load8(p + 8 * v), c[v]);
    }
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(y + n + 8 * v, c[v]);
  }
  for (; n + 8 <= n1; n += 8) {
    __m256 c0 = _mm256_setzero_ps();
    const uint16_t* p = b + n;
    for (int64_t i = 0; i < r; ++i, p += ldb) c0 = _mm256_fmadd_ps(_mm256_set1_ps(t[i]), load8(p), c0);
    _mm256_storeu_ps(y + n, c0);
  }
#endif
  // the rest (all of it without AVX2)
  for (int64_t j = n; j < n1; ++j) y[j] = 0.f;
  for (int64_t i = 0; i < r && n < n1; ++i) add_scaled_row(t[i], b + i * ldb, y, n, n1);
}

constexpr int64_t kColumnsPerTask = 128;  // of B, per thread-pool task
constexpr int64_t kMinWorkToThread = 16384;  // multiply-adds of the B product below which one thread does it all

struct Job {
  const float* t;  // (M, R)
  const uint16_t* b;
  float* y;  // (M, chunks * c)
  const int64_t* modules;
  int64_t M, R, r, c, chunks, tasks_per_chunk;
};

constexpr int64_t kRowsPerTask = 8;  // of x, per thread-pool task of the A product (prompt passes)

struct RowJob {
  const float* x;
  const uint16_t* a;
  float* t;  // (M, R)
  int64_t M, K, R;
};

void run_rows(void* data, size_t index) {
  const RowJob& j = *static_cast<const RowJob*>(data);
  for (int64_t m = (int64_t)index * kRowsPerTask; m < std::min(j.M, ((int64_t)index + 1) * kRowsPerTask); ++m)
    x_times_a(j.x + m * j.K, j.a, j.t + m * j.R, j.K, j.R);
}

void run_task(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  int64_t chunk = (int64_t)index / j.tasks_per_chunk, part = (int64_t)index % j.tasks_per_chunk;
  int64_t n0 = part * kColumnsPerTask, n1 = std::min(j.c, n0 + kColumnsPerTask);
  const uint16_t* b = j.b + chunk * j.r * j.c;
  int64_t width = j.chunks * j.c;
  for (int64_t m = 0; m < j.M; ++m)
    t_times_b(j.t + m * j.R + j.modules[chunk] * j.r, b, j.y + m * width + chunk * j.c, j.r, j.c, n0, n1);
}

struct LoraDeltaKernel {
  std::vector<int64_t> chunk_modules;

  LoraDeltaKernel(const OrtApi& api, const OrtKernelInfo* info) {
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
    auto x = ctx.GetInput(0), a = ctx.GetInput(1), b = ctx.GetInput(2);
    auto xs = x.GetTensorTypeAndShapeInfo().GetShape(), as = a.GetTensorTypeAndShapeInfo().GetShape(),
         bs = b.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.empty() || as.size() != 2 || (bs.size() != 2 && bs.size() != 3))
      ORT_CXX_API_THROW("LoraDelta: x must be (..., K), A (K, R), B (R, N) or (chunks, r, c)", ORT_INVALID_ARGUMENT);
    const int64_t K = xs.back(), R = as[1];
    if (as[0] != K) ORT_CXX_API_THROW("LoraDelta: A's rows differ from x's last dim", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
    int64_t chunks, r, c;
    std::vector<int64_t> one_module{0};
    const std::vector<int64_t>* modules = &one_module;
    if (bs.size() == 2) {
      chunks = 1, r = bs[0], c = bs[1];
      if (r != R) ORT_CXX_API_THROW("LoraDelta: B's rows differ from A's columns", ORT_INVALID_ARGUMENT);
    } else {
      chunks = bs[0], r = bs[1], c = bs[2];
      if ((int64_t)chunk_modules.size() != chunks)
        ORT_CXX_API_THROW("LoraDelta: B's chunk count differs from chunk_modules", ORT_INVALID_ARGUMENT);
      for (int64_t mod : chunk_modules)
        if (mod < 0 || (mod + 1) * r > R) ORT_CXX_API_THROW("LoraDelta: a chunk reads ranks A does not have", ORT_INVALID_ARGUMENT);
      modules = &chunk_modules;
    }
    std::vector<int64_t> ys(xs.begin(), xs.end());
    ys.back() = chunks * c;
    auto out = ctx.GetOutput(0, ys);
    float* y = out.GetTensorMutableData<float>();
    if (M == 0 || chunks * c == 0) return;
    if (R == 0 || r == 0) {
      std::memset(y, 0, sizeof(float) * M * chunks * c);
      return;
    }
    const float* xp = x.GetTensorData<float>();
    const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.GetTensorData<Ort::Float16_t>());
    const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.GetTensorData<Ort::Float16_t>());
    std::vector<float> t((size_t)(M * R));
    RowJob rows{xp, ap, t.data(), M, K, R};
    size_t row_tasks = (size_t)((M + kRowsPerTask - 1) / kRowsPerTask);
    if (row_tasks > 1 && M * K * R >= 4 * kMinWorkToThread) {  // a prompt pass: rows over the threads
      ctx.ParallelFor(run_rows, row_tasks, 0, &rows);
    } else {  // decode (one row): A is read once, on this thread
      for (size_t i = 0; i < row_tasks; ++i) run_rows(&rows, i);
    }
    Job job{t.data(), bp, y, modules->data(), M, R, r, c, chunks, (c + kColumnsPerTask - 1) / kColumnsPerTask};
    size_t tasks = (size_t)(chunks * job.tasks_per_chunk);
    if (M * chunks * r * c < kMinWorkToThread || tasks == 1) {
      for (size_t i = 0; i < tasks; ++i) run_task(&job, i);
    } else {
      ctx.ParallelFor(run_task, tasks, 0, &job);
    }
  }
};

struct LoraDeltaOp : Ort::CustomOpBase<LoraDeltaOp, LoraDeltaKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new LoraDeltaKernel(api, info); }
  const char* GetName() const { return "LoraDelta"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

LoraDeltaOp the_op;
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
int lora_edge_kernel_version() { return 1; }

}  // extern "C"
