// The frame engine's block kernels (csrc/cpu/frame_engine.cpp): y = x W^T over a block-sparse matrix stored with
// its blocks transposed, few rows (a live stream) or 16-row tiles, compiled once per weight dtype in
// frame_engine_f32.cpp and frame_engine_bf16.cpp (AMNETS_ENGINE_KERNELS), so that the parts compile in parallel
// (frame_engine.cpp with them took ~90 s of one core here, the longest source of the build after bsr's).

#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace amnets::cpu::engine_kernels {

using at::Tensor;

// A block-sparse matrix owned by the engine, blocks transposed: values_t[k][j][i] = W_k[i][j].
struct Bsr {
  Tensor values_t, crow, col;
  int64_t n = 0, k = 0, b = 0;
  int64_t pad() const { return (k + b - 1) / b * b; }
  int64_t block_rows() const { return (n + b - 1) / b; }
};

// ---------------------------------------------------------------------------------------------------
// y (M, N) = x (M, pad) W^T over the transposed blocks; x zero past K (so are the blocks), y row stride N.

using simd::kWidth;
using simd::load16;
using simd::vfloat;

// Few rows: MT rows of x, block row r; acc[s][m][v] holds outputs r*B + 16v .. +15 of row m, summed over
// the j = s mod S. S independent sums keep ~8 FMA chains in flight (one row of one 32-block has only two).
template <typename T, int B, int MT, bool PF>
AMNETS_INLINE void few_rows(const T* vt, const int32_t* crow, const int32_t* col, int64_t n, const float* x,
                            int64_t ldx, float* y, int64_t r) {
  constexpr int V = B / kWidth;
  constexpr int S = simd::partial_sums(MT * V);
  vfloat acc[S][MT][V] = {};
  for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
    const T* blk = vt + k * B * B;
    const float* xk = x + int64_t(col[k]) * B;
    for (int j0 = 0; j0 < B; j0 += S) {
      AMNETS_UNROLL
      for (int s = 0; s < S; ++s) {
        // PF (weights far larger than L2: they stream from memory): prefetch two blocks ahead, a block row's
        // blocks being contiguous (~15% on a 20 MB layer; on cache-resident weights it only costs issue slots).
        if constexpr (PF) {
          AMNETS_UNROLL
          for (int line = 0; line < int(B * sizeof(T)) / 64; ++line)
            __builtin_prefetch(reinterpret_cast<const char*>(blk + 2 * B * B + (j0 + s) * B) + 64 * line);
        }
        vfloat w[V];
        if constexpr (simd::kPairs<T, B>) {  // bf16: outputs in pair order (even, odd), put back in order below
          simd::load_row_pairs(blk + (j0 + s) * B, w);
        } else {
          AMNETS_UNROLL
          for (int v = 0; v < V; ++v) w[v] = load16(blk + (j0 + s) * B + v * kWidth);
        }
        AMNETS_UNROLL
        for (int m = 0; m < MT; ++m) {
          const float xm = xk[m * ldx + j0 + s];
          AMNETS_UNROLL
          for (int v = 0; v < V; ++v) acc[s][m][v] += w[v] * xm;
        }
      }
    }
  }
  const int64_t rows = std::min<int64_t>(B, n - r * B);
  for (int m = 0; m < MT; ++m) {
    float* out = y + m * n + r * B;
    vfloat sums[V];
    AMNETS_UNROLL
    for (int v = 0; v < V; ++v) {
      sums[v] = acc[0][m][v];
      AMNETS_UNROLL
      for (int s = 1; s < S; ++s) sums[v] += acc[s][m][v];
    }
    if constexpr (simd::kPairs<T, B>) simd::to_element_order(sums);
    AMNETS_UNROLL
    for (int v = 0; v < V; ++v) {
      const vfloat sum = sums[v];
      if ((v + 1) * kWidth <= rows) {
        simd::store(out + v * kWidth, sum);
      } else {
        for (int64_t i = v * kWidth; i < rows; ++i) out[i] = sum[i - v * kWidth];
      }
    }
  }
}

// Many rows: xt is x transposed (pad, mp), 16 rows of x per vector from m0; acc[i] is output r*B + i0 + i.
// PF as in few_rows: without it a B=16 all-full frame of 4096x2048 layers spent half its time on the first
// FMA of each weight line, waiting for memory (perf annotate; 6.9 GB/s of weights against ~20 a core reads).
template <typename T, int B, bool PF>
AMNETS_INLINE void many_rows(const T* vt, const int32_t* crow, const int32_t* col, int64_t n, const float* xt,
                             int64_t mp, int64_t rows_x, float* y, int64_t r, int64_t m0) {
  const int64_t rows = std::min<int64_t>(B, n - r * B), lanes = std::min<int64_t>(kWidth, rows_x - m0);
  for (int64_t i0 = 0; i0 < rows; i0 += kWidth) {
    vfloat acc[kWidth] = {};
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      const T* blk = vt + k * B * B + i0;
      const float* xk = xt + int64_t(col[k]) * B * mp + m0;
      for (int j = 0; j < B; ++j) {
        if constexpr (PF) __builtin_prefetch(blk + 2 * B * B + j * B);
        const vfloat xv = simd::load(xk + j * mp);
        AMNETS_UNROLL
        for (int i = 0; i < kWidth; ++i) acc[i] += simd::scalar(blk[j * B + i]) * xv;
      }
    }
    simd::store_transposed(acc, y + m0 * n + r * B + i0, n, lanes, std::min<int64_t>(kWidth, rows - i0));
  }
}

// Rows that take few_rows rather than a 16-row tile of many_rows, which costs the same for 1 or 16 rows
// and about what few_rows does for 16 (one AMD EPYC core, H=192 and 512 all-full frames): up to 12, and the
// rows past the last full tile when at most 12 are left (8 rows took 0.53x, 17 rows 0.60x the time of tiles).
constexpr int64_t kFewRowsMax = 12;

template <typename T, int B, bool PF>
AMNETS_INLINE void few_rows_all(const Bsr& w, const T* vt, const int32_t* crow, const int32_t* col, const float* x,
                                int64_t ldx, int64_t M, float* y, int64_t r) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) few_rows<T, B, 4, PF>(vt, crow, col, w.n, x + m * ldx, ldx, y + m * w.n, r);
  switch (M - m) {
    case 3: return few_rows<T, B, 3, PF>(vt, crow, col, w.n, x + m * ldx, ldx, y + m * w.n, r);
    case 2: return few_rows<T, B, 2, PF>(vt, crow, col, w.n, x + m * ldx, ldx, y + m * w.n, r);
    case 1: return few_rows<T, B, 1, PF>(vt, crow, col, w.n, x + m * ldx, ldx, y + m * w.n, r);
    default: return;
  }
}

template <typename T, int B>
AMNETS_INLINE void block_rows_b(const Bsr& w, const T* vt, const float* x, int64_t ldx, int64_t M, const float* xt,
                                int64_t mp, float* y, int64_t r0, int64_t r1) {
  const int32_t *crow = w.crow.data_ptr<int32_t>(), *col = w.col.data_ptr<int32_t>();
  const bool streamed = w.values_t.nbytes() > (int64_t(4) << 20);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t m0 = 0;  // 16-row tiles while more than kFewRowsMax rows are left, then the few-row kernel
    for (; xt != nullptr && M - m0 > kFewRowsMax; m0 += kWidth) {
      if (streamed) {
        many_rows<T, B, true>(vt, crow, col, w.n, xt, mp, M, y, r, m0);
      } else {
        many_rows<T, B, false>(vt, crow, col, w.n, xt, mp, M, y, r, m0);
      }
    }
    if (streamed) {
      few_rows_all<T, B, true>(w, vt, crow, col, x + m0 * ldx, ldx, M - m0, y + m0 * w.n, r);
    } else {
      few_rows_all<T, B, false>(w, vt, crow, col, x + m0 * ldx, ldx, M - m0, y + m0 * w.n, r);
    }
  }
}

template <typename T>
AMNETS_INLINE void block_rows(const Bsr& w, const T* vt, const float* x, int64_t ldx, int64_t M, const float* xt,
                              int64_t mp, float* y, int64_t r0, int64_t r1) {
  switch (w.b) {
    case 16: return block_rows_b<T, 16>(w, vt, x, ldx, M, xt, mp, y, r0, r1);
    case 32: return block_rows_b<T, 32>(w, vt, x, ldx, M, xt, mp, y, r0, r1);
    default: return block_rows_b<T, 64>(w, vt, x, ldx, M, xt, mp, y, r0, r1);
  }
}

// Block rows [r0, r1) of y (M, n) from x (M, pad, row stride ldx), or from xt (x transposed, pad x mp) for the
// 16-row tiles (nullptr: few rows only); one entry point per weight dtype.
void block_rows_f32(const Bsr& w, const float* x, int64_t ldx, int64_t M, const float* xt, int64_t mp, float* y,
                    int64_t r0, int64_t r1);
void block_rows_bf16(const Bsr& w, const float* x, int64_t ldx, int64_t M, const float* xt, int64_t mp, float* y,
                     int64_t r0, int64_t r1);

// Defines block_rows_NAME for weights of type T: a wrapper of a function compiled per instruction set.
#define AMNETS_ENGINE_KERNELS(T, NAME)                                                                          \
  namespace {                                                                                                   \
  AMNETS_CLONES void clones_##NAME(const Bsr& w, const float* x, int64_t ldx, int64_t M, const float* xt,       \
                                   int64_t mp, float* y, int64_t r0, int64_t r1) {                              \
    block_rows<T>(w, w.values_t.data_ptr<T>(), x, ldx, M, xt, mp, y, r0, r1);                                   \
  }                                                                                                             \
  }                                                                                                             \
  void block_rows_##NAME(const Bsr& w, const float* x, int64_t ldx, int64_t M, const float* xt, int64_t mp,     \
                         float* y, int64_t r0, int64_t r1) {                                                    \
    clones_##NAME(w, x, ldx, M, xt, mp, y, r0, r1);                                                             \
  }

}  // namespace amnets::cpu::engine_kernels
