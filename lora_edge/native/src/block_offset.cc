// BlockOffset (block_offset.h), and the offsets' product that LoraDelta and LoraDeltaQ8 share.
#include "block_offset.h"

#include "branch.h"
#include "common.h"
#include "contract.h"
#include "dot.h"

namespace lora_edge {

OffsetRows block_offset_rows(const Ort::ConstValue& offsets, const float* x, BlockSums& s_mem, int64_t M, int64_t K,
                             int64_t N, int64_t block, const char* op) {
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

void add_offset_rows(Ort::KernelContext& ctx, const OffsetRows& rows, float* y, int64_t M, int64_t N) {
  if (rows.nb == 0) return;
  const int64_t first = 0;
  Job<F16> job{rows.s, rows.o, y, &first, M, rows.nb, rows.nb, N, 1, (N + kColumnsPerTask - 1) / kColumnsPerTask};
  run_b_product<F16>(ctx, job);
}

namespace {

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

struct BlockOffsetOp : CpuOpBase<BlockOffsetOp, BlockOffsetKernel> {
  const char* GetName() const { return contract::kBlockOffset; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, offsets, base
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

BlockOffsetOp the_op;

}  // namespace

const OrtCustomOp* block_offset_op() { return &the_op; }

}  // namespace lora_edge
