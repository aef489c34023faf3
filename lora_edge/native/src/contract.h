// What lora-edge's compile side writes and this kernel reads. The one definition is
// lora_edge/native/contract.py (imported by the exporter, the runtime and the tests): this header mirrors it,
// and the two change together.
#pragma once

#include <cstdint>

namespace lora_edge::contract {

constexpr const char* kDomain = "lora_edge";  // DOMAIN: the ONNX domain of the operators
constexpr int kKernelVersion = 6;  // KERNEL_VERSION: the newest contract this kernel implements

// Op: the operators' names in that domain.
constexpr const char* kLoraDelta = "LoraDelta";
constexpr const char* kLoraDeltaQ8 = "LoraDeltaQ8";
constexpr const char* kBlockOffset = "BlockOffset";
constexpr const char* kMatMulQ4 = "MatMulQ4";
constexpr const char* kMatMulQ8 = "MatMulQ8";

constexpr int64_t kQ8xWidth = 16;  // Q8X_WIDTH: a q8x B's chunk width is a multiple of this (one vector of columns)
constexpr int64_t kQ8xKBlock = 32;  // Q8X_K_BLOCK: a q8x A's rows are zero-padded to a multiple of this

// The w8a8 blob (W8A8_BLOB, one int8 tensor): int64 n, then per branch (a node's attribute `slot`) the int64
// fields below (BLOB_FIELDS, in this order), then the arrays, each at a multiple of kBlobAlign bytes from the blob's
// start (BLOB_ALIGN; the kernel itself needs only the float32 scales' 4). Offsets are in bytes from the blob's start;
// rank and chunk_rank are 0 for a branch the adapter leaves alone (chunks and chunk_width still give its width).
enum BlobField : int {
  kAOffset,  // a_offset: A (ceil(K / 32) * 8, rank, 4) int8 in the q8x order
  kAScaleOffset,  // a_scale_offset: A_scale (rank) float32
  kBOffset,  // b_offset: B (chunks, chunk_rank / 4, chunk_width, 4) int8 in the q8x order
  kBScaleOffset,  // b_scale_offset: B_scale (chunks, chunk_rank) float32
  kRank,  // rank: R, A's columns
  kChunks,  // chunks
  kChunkRank,  // chunk_rank: r, the ranks each chunk reads
  kChunkWidth,  // chunk_width: c, each chunk's output columns
  kBlobFields  // 8
};
constexpr int64_t kBlobAlign = 64;

}  // namespace lora_edge::contract
