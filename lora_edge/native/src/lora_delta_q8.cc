// LoraDeltaQ8 (lora_delta_q8.h): the branch kernel (lora_delta.h) on int8 A and B with their scales, 2-D or in the
// q8x order, alone or as a slot of the w8a8 blob.
#include "lora_delta_q8.h"

#include "common.h"
#include "contract.h"
#include "lora_delta.h"
#include "matmul_q4.h"

namespace lora_edge {

static_assert(kQ4Block == contract::kQ8xKBlock && kQ4Group == contract::kQ8xWidth,
              "x's int8 blocks and the q8x column vectors are contract.py's Q8X_K_BLOCK and Q8X_WIDTH");

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

BlobSlot blob_slot(const Ort::ConstValue& blob, int64_t slot, int64_t nb) {
  using namespace contract;
  constexpr int64_t kSlotBytes = kBlobFields * sizeof(int64_t);  // one slot's fields
  const auto size = (int64_t)blob.GetTensorTypeAndShapeInfo().GetElementCount();
  const uint8_t* p = static_cast<const uint8_t*>(blob.GetTensorRawData());
  int64_t n = 0, f[kBlobFields];
  if (size >= 8) std::memcpy(&n, p, 8);
  if (slot < 0 || n <= slot || (size - 8) / kSlotBytes < n)
    ORT_CXX_API_THROW("LoraDeltaQ8: the w8a8 blob has no part for this node's slot (an adapter of another package?)",
                      ORT_INVALID_ARGUMENT);
  std::memcpy(f, p + 8 + kSlotBytes * slot, sizeof(f));
  const int64_t R = f[kRank], chunks = f[kChunks], r = f[kChunkRank], c = f[kChunkWidth];
  auto fits = [&](int64_t off, int64_t bytes, int64_t align) { return off >= 0 && off % align == 0 && bytes <= size - off; };
  const bool dims = R >= 0 && chunks >= 0 && r >= 0 && c >= 0 && R % 4 == 0 && r % 4 == 0 && c % kQ4Group == 0 &&
                    R < (1 << 20) && chunks < (1 << 20) && r < (1 << 20) && c < (1 << 24);
  if (!dims || !fits(f[kAOffset], nb * kQ4Block * R, 1) || !fits(f[kAScaleOffset], 4 * R, 4) ||
      !fits(f[kBOffset], chunks * r * c, 1) || !fits(f[kBScaleOffset], 4 * chunks * r, 4))
    ORT_CXX_API_THROW("LoraDeltaQ8: the w8a8 blob's part for this node does not fit its input width or the blob",
                      ORT_INVALID_ARGUMENT);
  return BlobSlot{p + f[kAOffset], reinterpret_cast<const float*>(p + f[kAScaleOffset]), p + f[kBOffset],
                  reinterpret_cast<const float*>(p + f[kBScaleOffset]), R, chunks, r, c};
}

namespace {

struct LoraDeltaQ8Op : DeltaOpBase<LoraDeltaQ8Op, LoraDeltaKernel<I8, true>> {
  const char* GetName() const { return contract::kLoraDeltaQ8; }
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

LoraDeltaQ8Op the_op;

}  // namespace

const OrtCustomOp* lora_delta_q8_op() { return &the_op; }

}  // namespace lora_edge
