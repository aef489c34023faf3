// LoraDelta (lora_delta.h): the branch kernel on float16 A and B.
#include "lora_delta.h"

#include "common.h"
#include "contract.h"

namespace lora_edge {
namespace {

struct LoraDeltaOp : DeltaOpBase<LoraDeltaOp, LoraDeltaKernel<F16, false>> {
  const char* GetName() const { return contract::kLoraDelta; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // x, A, B, base, extra, offsets, packed
    return i == 1 || i == 2 || i == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
           : i == 6                   ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

LoraDeltaOp the_op;

}  // namespace

const OrtCustomOp* lora_delta_op() { return &the_op; }

}  // namespace lora_edge
