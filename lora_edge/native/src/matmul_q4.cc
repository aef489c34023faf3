// MatMulQ4 (matmul_q4.h), and the int4 product that LoraDelta and LoraDeltaQ8 run in their B product's tasks.
#include "matmul_q4.h"

#include "common.h"
#include "contract.h"
#include "dot.h"

namespace lora_edge {

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

constexpr int64_t kQ4Rows = 4;  // rows of x per pass over a group's weights (a prompt pass reuses them from L1)

// Group g's columns for every row: tiles of kQ4Rows rows, then the remainder.
template <bool Offsets>
static void q4_group(const Q4Job& j, int64_t g) {
  int64_t m = 0;
  for (; m + kQ4Rows <= j.M; m += kQ4Rows) q4_group_rows<kQ4Rows, Offsets>(j, g, m);
  switch (j.M - m) {
    case 3: q4_group_rows<3, Offsets>(j, g, m); break;
    case 2: q4_group_rows<2, Offsets>(j, g, m); break;
    case 1: q4_group_rows<1, Offsets>(j, g, m); break;
    default: break;
  }
}

void q4_groups(const Q4Job& j, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < std::min(g1, j.G); ++g) j.offsets ? q4_group<true>(j, g) : q4_group<false>(j, g);
}

constexpr int64_t kQ4GroupsPerTask = 4;  // 64 columns per thread-pool task of a projection alone

static void run_q4_task(void* data, size_t index) {
  q4_groups(*static_cast<const Q4Job*>(data), (int64_t)index * kQ4GroupsPerTask, ((int64_t)index + 1) * kQ4GroupsPerTask);
}

void run_q4(Ort::KernelContext& ctx, Q4Job& job) {
  const int64_t tasks = (job.G + kQ4GroupsPerTask - 1) / kQ4GroupsPerTask;
  run_tasks(ctx, run_q4_task, (size_t)tasks, &job);
}

Q4Job q4_job(const Ort::ConstValue& packed, const float* x, QuantizedRows& qx, float* y, int64_t M, int64_t K, int64_t N,
             const char* op) {
  auto ws = packed.GetTensorTypeAndShapeInfo().GetShape();
  const int64_t nb = (K + kQ4Block - 1) / kQ4Block, G = (N + kQ4Group - 1) / kQ4Group;
  if (ws.size() != 3 || ws[0] != G || ws[1] != nb || (ws[2] != kQ4Bytes && ws[2] != kQ4SymBytes))
    ORT_CXX_API_THROW(std::string(op) + ": packed must be (ceil(N / 16), ceil(K / 32), 320 or 288)", ORT_INVALID_ARGUMENT);
  quantize_rows(x, M, K, nb, qx);
  return Q4Job{static_cast<const uint8_t*>(packed.GetTensorRawData()), &qx, y, M, N, nb, G, ws[2] == kQ4Bytes};
}

namespace {

// MatMulQ4(x, packed) with attributes K and N: y (..., N) = x (..., K) @ W_hat.T.
struct MatMulQ4Kernel {
  int64_t K, N;

  MatMulQ4Kernel(const OrtApi&, const OrtKernelInfo* info) : K(int_attribute(info, "K", 0)), N(int_attribute(info, "N", 0)) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0);
    int64_t M;
    float* y = product_output(ctx, x, K, N, "MatMulQ4", M);
    QuantizedRows& qx = workspace().x;
    Q4Job job = q4_job(ctx.GetInput(1), x.GetTensorData<float>(), qx, y, M, K, N, "MatMulQ4");
    if (M == 0) return;
    std::memset(y, 0, sizeof(float) * M * N);
    run_q4(ctx, job);
  }
};

struct MatMulQ4Op : CpuOpBase<MatMulQ4Op, MatMulQ4Kernel> {
  const char* GetName() const { return contract::kMatMulQ4; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, packed
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

MatMulQ4Op the_op;

}  // namespace

const OrtCustomOp* matmul_q4_op() { return &the_op; }

}  // namespace lora_edge
