// The LoRA branch's two products as thread-pool tasks: x @ A by rows (prompt passes; a decode step's one row runs on
// the calling thread), then t @ B by columns, each task also running, over its columns, the other products a node
// may carry (the offsets' correction, the int4 base projection), so that a node makes one pass and one ParallelFor.
#pragma once

#include "block_offset.h"
#include "common.h"
#include "dot.h"
#include "matmul_q4.h"

namespace lora_edge {

constexpr int64_t kColumnsPerTask = 128;  // of B, per thread-pool task
constexpr int64_t kMinWorkToThread = 16384;  // multiply-adds of the B product below which one thread does it all

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

}  // namespace lora_edge
