// The branch kernel of LoraDelta (float16 A and B, lora_delta.cc) and LoraDeltaQ8 (int8, lora_delta_q8.h): one node
// per adapter slot of a projection,
//   LoraDelta(x, A, B[, base, extra, offsets, packed]) -> base + extra + (x @ A) @ B
// with A and B switchable inputs and x, the output and the arithmetic in float32 (M = the product of x's leading dims):
//   x (..., K) float32;  A (K, R) float16, R = n_modules * r;
//   B (R, N) float16 (one module), or (chunks, r, c) float16 with attribute `chunk_modules`
//   (the module each chunk reads its r ranks from; N = chunks * c).
// An empty R (no adapter bound) adds nothing. This reads float16 weights (half the bytes of ORT's float32 MatMul), runs
// A and B in one node (half the nodes) and splits the B product over the session's intra-op threads (branch.h).
//
// The optional inputs: base and extra are shaped like the output (the base projection and, at int4, its float-offset
// correction): the node adds its delta onto the base's own sum, so an adapter costs no separate Add or Sum node.
// offsets (attribute `offset_block`) is BlockOffset's correction (block_offset.h) and packed MatMulQ4's weight
// (matmul_q4.h): the node runs it in its B product's tasks over the same columns, so an int4 projection with its
// adapter is one node and one pass.
#pragma once

#include "block_offset.h"
#include "branch.h"
#include "common.h"
#include "lora_delta_q8.h"
#include "matmul_q4.h"

namespace lora_edge {

// LoraDelta (E = F16, no scales) and LoraDeltaQ8 (E = I8; inputs x, A, A_scale, B, B_scale); then
// the optional base, extra, offsets and packed.
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
    bool q8x, one_chunk;  // q8x: int8 A and B in VNNI order
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

// What LoraDelta and LoraDeltaQ8 declare alike: their inputs from kBase on (base, extra, offsets, packed) optional.
template <class Op, class Kernel>
struct DeltaOpBase : CpuOpBase<Op, Kernel> {
  size_t GetInputTypeCount() const { return Kernel::kBase + Kernel::kOptional; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= Kernel::kBase ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                              : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
};

}  // namespace lora_edge
