// CPU kernels of one file used by another (csrc/cpu/row_products.cpp: the low-rank LSTM's and the frame
// engine's small-row products): raw-pointer entry points on checked float data, no ATen op inside (a
// streaming frame at small H costs what its calls cost), threads on our pool (csrc/cpu/parallel.h).
#pragma once

#include <cstdint>

namespace amnets::cpu {

// y (batch, rows) = x (batch, cols) A^T (or += with accumulate) for A (rows, cols) row-major float;
// x contiguous, batch <= kMaxDotBatch.
constexpr int64_t kMaxDotBatch = 4;
void small_batch_mm(const float* x, int64_t batch, const float* a, int64_t rows, int64_t cols, float* y,
                    bool accumulate);

// out (M, G) (+)= s (M, R; row stride lds) U for U given transposed as ut (R, G) row-major; out contiguous.
// Threads split the outputs in 64s once the product has ~256K multiply-adds.
void expand(const float* ut, int64_t R, int64_t G, const float* s, int64_t lds, int64_t M, float* out,
            bool accumulate);

}  // namespace amnets::cpu
