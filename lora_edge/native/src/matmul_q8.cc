// MatMulQ8 (matmul_q8.h).
#include "matmul_q8.h"

#include "common.h"
#include "contract.h"
#include "dot.h"
#include "matmul_q4.h"

namespace lora_edge {

// Columns per tile: 16 rows of codes (9 KB at K = 576) stay in L1 while every row of x passes over them.
constexpr int64_t kQ8Tile = 16;
// Columns per thread-pool task: the head's 49152 columns are 192 tasks.
constexpr int64_t kQ8TaskColumns = 256;

void q8_columns(const Q8Job& j, int64_t n0, int64_t n1) {
  const int64_t nb = j.nb, row = nb * kQ8Block;  // a column's codes, and a row of x's
  const QuantizedRows& x = *j.x;
  for (int64_t c = n0; c < n1; c += kQ8Tile) {
    const int64_t c1 = std::min(n1, c + kQ8Tile);
    // the next tile runs ahead of the hardware prefetcher, which stops at each 4 KB page
    if (c1 < n1) prefetch_lines<2>(j.codes + c1 * row, 0, (size_t)(std::min(kQ8Tile, n1 - c1) * row));
    for (int64_t m = 0; m < j.M; ++m) {
      const int8_t* xq = x.q.data() + m * row;
      const float* d = x.d.data() + m * nb;
      const int32_t* qsum = x.qsum.data() + m * nb;
      float* y = j.y + m * j.N;
      for (int64_t n = c; n < c1; ++n) y[n] = q8_dot(j.codes + n * row, j.scales + n * nb, xq, d, qsum, nb);
    }
  }
}

static void run_q8_task(void* data, size_t index) {
  const Q8Job& j = *static_cast<const Q8Job*>(data);
  const int64_t n0 = (int64_t)index * kQ8TaskColumns;
  q8_columns(j, n0, std::min(j.N, n0 + kQ8TaskColumns));
}

namespace {

// MatMulQ8(x, codes, scales) with attributes K and N: y (..., N) = x (..., K) @ W_hat.T.
struct MatMulQ8Kernel {
  int64_t K, N;

  MatMulQ8Kernel(const OrtApi&, const OrtKernelInfo* info) : K(int_attribute(info, "K", 0)), N(int_attribute(info, "N", 0)) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0);
    auto codes = ctx.GetInput(1), scales = ctx.GetInput(2);
    int64_t M;
    float* y = product_output(ctx, x, K, N, "MatMulQ8", M);
    const int64_t nb = (K + kQ8Block - 1) / kQ8Block;
    auto cs = codes.GetTensorTypeAndShapeInfo().GetShape(), ss = scales.GetTensorTypeAndShapeInfo().GetShape();
    if (cs.size() != 3 || cs[0] != N || cs[1] != nb || cs[2] != kQ8Block || ss.size() != 2 || ss[0] != N || ss[1] != nb)
      ORT_CXX_API_THROW("MatMulQ8: codes must be (N, ceil(K / 32), 32) and scales (N, ceil(K / 32))", ORT_INVALID_ARGUMENT);
    if (M == 0) return;
    QuantizedRows& qx = workspace().x;
    quantize_rows(x.GetTensorData<float>(), M, K, nb, qx);
    Q8Job job{static_cast<const uint8_t*>(codes.GetTensorRawData()), static_cast<const uint16_t*>(scales.GetTensorRawData()),
              &qx, y, M, N, nb};
    const int64_t tasks = (N + kQ8TaskColumns - 1) / kQ8TaskColumns;
    run_tasks(ctx, run_q8_task, (size_t)tasks, &job);
  }
};

struct MatMulQ8Op : CpuOpBase<MatMulQ8Op, MatMulQ8Kernel> {
  const char* GetName() const { return contract::kMatMulQ8; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, codes, scales
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                                               : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
};

MatMulQ8Op the_op;

}  // namespace

const OrtCustomOp* matmul_q8_op() { return &the_op; }

}  // namespace lora_edge
