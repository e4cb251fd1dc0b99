// CPU kernels of one face used by another file (lowrank_lstm.cpp's row dots, by the frame engine): raw-pointer
// entry points on checked data, no ATen op inside (a streaming frame at small H costs what its calls cost).
#pragma once

#include <cstdint>

namespace amnets::cpu {

// y (batch, rows) = x (batch, cols) A^T (or += with accumulate) for A (rows, cols) row-major float;
// x contiguous, batch <= kMaxDotBatch.
constexpr int64_t kMaxDotBatch = 4;
void small_batch_mm(const float* x, int64_t batch, const float* a, int64_t rows, int64_t cols, float* y,
                    bool accumulate);

}  // namespace amnets::cpu
