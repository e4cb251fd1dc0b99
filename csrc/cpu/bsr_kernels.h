// The SIMD kernels of the CPU face of bsr_linear (csrc/cpu/bsr.cpp: the layout, the ops, the AMX paths): the
// problem, the forward / grad_x / grad_values templates for b in {16, 32, 64}, and per weight dtype their
// entry points, compiled once per dtype in bsr_f32.cpp and bsr_bf16.cpp (AMNETS_BSR_KERNELS). One source held
// them all and took over 5 minutes to compile on the lent GPU machine's CPU (2026-12-04), longer than every
// other source of the build; split by dtype, the parts compile in parallel.

#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace amnets::cpu::bsr_kernels {

using at::Tensor;
using simd::kPairs;
using simd::kWidth;
using simd::vfloat;

using simd::load16;
using simd::scalar;

// w with lanes [valid, 16) set to 0: weights outside the logical matrix are never used, whatever
// they hold (a select, not a multiply, so that an inf there cannot turn into NaN).
AMNETS_INLINE vfloat keep_lanes_below(vfloat w, int64_t valid) {
  vfloat lane;
  AMNETS_UNROLL
  for (int i = 0; i < kWidth; ++i) lane[i] = float(i);
  return lane < float(valid) ? w : simd::splat(0.f);
}

// The same for a row of 32 read as pairs: even lane l is column 2l, odd lane l column 2l + 1.
AMNETS_INLINE void keep_pairs_below(vfloat& even, vfloat& odd, int64_t valid) {
  vfloat lane;
  AMNETS_UNROLL
  for (int i = 0; i < kWidth; ++i) lane[i] = float(2 * i);
  even = lane < float(valid) ? even : simd::splat(0.f);
  odd = lane + 1.f < float(valid) ? odd : simd::splat(0.f);
}

// What every kernel needs to know about the problem.
struct Problem {
  int64_t rows;  // M
  int64_t out_features, in_features;  // N, K (logical)
  int64_t block;  // b
  int64_t block_rows, block_cols;  // Nb, Kb
  const int32_t* crow;
  const int32_t* col;
  // Valid entries of block row r / block column c (b except in the last, partial one).
  int64_t rows_in(int64_t r) const { return std::min(block, out_features - r * block); }
  int64_t cols_in(int64_t c) const { return std::min(block, in_features - c * block); }
};

// ---------------------------------------------------------------------------------------------------
// forward, few rows: y[m, r*B + i] = sum_k sum_j W_k[i, j] x[m, col_k*B + j]

// How far ahead the forwards ask for weights: about a DRAM latency of one core's stream.
constexpr int64_t kPrefetchBytes = 8192;

// Ask for the slice a pass reads (`span` bytes from row i0 of a block; passes of `pass` rows) kPrefetchBytes
// of weights ahead of block k of block row r, one request per cache line: a pass reads a strided slice of
// every block (rows i0.. of each), which the hardware prefetchers follow poorly (measured: ~10 GB/s on one
// AMD EPYC core where MKL's dense GEMV reads ~17). Near a row's end it asks for what comes next: the row's
// next slice, or after its last the next row's first (its blocks follow in memory); at density 0.1 a block
// row of a 2048-wide matrix holds ~6 blocks, so stopping at the row's end left most of them unrequested.
// Into: prefetcht0 (L1) or prefetcht1 (L2). Slices go to L2: on one AMD EPYC core, weights from DRAM, W
// 4096x2048 b=32, the many-row fp32 and bf16 (vdpbf16ps) kernels at 16 rows took 0.75-0.85x and the few-row
// bf16 kernel at 1 row 0.78-0.95x the time they took with prefetcht0, and about the same on weights resident
// in L3. The few-row fp32 kernel's whole-block stream (one pass a row) stays in L1: into L2 its L3-resident
// case took 1.1-1.15x (d = 0.1, 0.25, 1 row) for at most 0.9x from DRAM.
constexpr int kIntoL1 = 3, kIntoL2 = 2;
template <int Into>
AMNETS_INLINE void prefetch_span(const void* from, int64_t span) {
  const char* at = static_cast<const char*>(from);
  for (int64_t line = 0; line < span; line += 64) __builtin_prefetch(at + line, 0, Into);
}

template <typename T, int B, int Into = kIntoL2>
AMNETS_INLINE void prefetch_block(const Problem& p, const T* values, int64_t k, int64_t r, int64_t i0, int64_t pass,
                                  int64_t span) {
  constexpr int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (B * B * int64_t(sizeof(T))));
  int64_t next = k + ahead;
  if (next >= p.crow[r + 1]) {
    if (i0 + pass < p.rows_in(r)) {
      next -= p.crow[r + 1] - p.crow[r], i0 += pass;
      if (next >= p.crow[r + 1]) return;  // a row of fewer blocks than `ahead`
    } else {
      if (next >= p.crow[p.block_rows]) return;
      i0 = 0;
    }
  }
  prefetch_span<Into>(values + next * B * B + i0 * B, span);
}

// The few-row kernels' end of a pass: acc[i][m] holds the lanes of output r*B + i0 + i of row m0 + m of y; each
// summed across its lanes (hsum16), stored where the block row has that output (rows of it in all).
template <int B, int IT, int MT>
AMNETS_INLINE void store_dots(const vfloat (&acc)[IT][MT], const Problem& p, float* y, int64_t r, int64_t i0,
                              int64_t m0, int64_t rows) {
  vfloat flat[kWidth];  // accumulator i * MT + m
  AMNETS_UNROLL
  for (int i = 0; i < IT; ++i)
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m) flat[i * MT + m] = acc[i][m];
  const vfloat sums = simd::hsum16(flat);
  float* out = y + m0 * p.out_features + r * B + i0;
  if (MT == 1 && rows - i0 >= kWidth) {  // one row of x: 16 consecutive outputs
    simd::store(out, sums);
  } else {
    for (int i = 0; i < IT && i0 + i < rows; ++i)
      AMNETS_UNROLL
      for (int m = 0; m < MT; ++m) out[m * p.out_features + i] = sums[i * MT + m];
  }
}

template <typename T, int B, int MT>
AMNETS_INLINE void forward_dot(const Problem& p, const T* values, const float* x, int64_t ldx, float* y,
                               int64_t r, int64_t m0) {
  constexpr int V = B / kWidth;           // vectors per block row
  constexpr int IT = kWidth / MT;         // block rows i per pass: IT * MT accumulators
  const int64_t rows = p.rows_in(r), last_col = p.block_cols - 1, last_cols = p.cols_in(last_col);
  for (int64_t i0 = 0; i0 < rows; i0 += IT) {
    vfloat acc[IT][MT] = {};
    for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) {
      const T* blk = values + k * B * B + i0 * B;
      // Few rows: the weights stream from memory. fp32: whole blocks in the first pass (a sequential
      // stream; later passes find the block row in L2), not at 4 rows (no gain resolved from DRAM, 1.1-1.3x
      // on L3-resident weights with prefetcht0); bf16: each pass's own slice at every row count (measured
      // faster there: the widening, not the stream, bounds bf16; at 4 rows from DRAM 0.7-0.8x, resident ~1x).
      if constexpr (sizeof(T) == 4) {
        if constexpr (MT <= 2) {
          if (i0 == 0) prefetch_block<T, B, kIntoL1>(p, values, k, r, 0, rows, B * B * int64_t(sizeof(T)));
        }
      } else {
        prefetch_block<T, B>(p, values, k, r, i0, IT, IT * B * int64_t(sizeof(T)));
      }
      const float* xk = x + p.col[k] * B;
      const bool partial = p.col[k] == last_col && last_cols < B;
      if constexpr (kPairs<T, B>) {  // a dot product in any order: x's columns go into the weights' pair order
        AMNETS_UNROLL
        for (int q = 0; q < V / 2; ++q) {
          vfloat xe[MT], xo[MT];
          AMNETS_UNROLL
          for (int m = 0; m < MT; ++m) {
            const float* xq = xk + (m0 + m) * ldx + q * 2 * kWidth;
            simd::deinterleave(simd::load(xq), simd::load(xq + kWidth), xe[m], xo[m]);
          }
          AMNETS_UNROLL
          for (int i = 0; i < IT; ++i) {
            vfloat we, wo;
            simd::load_pairs(blk + i * B + q * 2 * kWidth, we, wo);
            if (partial) keep_pairs_below(we, wo, last_cols - q * 2 * kWidth);
            AMNETS_UNROLL
            for (int m = 0; m < MT; ++m) acc[i][m] += we * xe[m], acc[i][m] += wo * xo[m];
          }
        }
        continue;
      }
      AMNETS_UNROLL
      for (int v = 0; v < V; ++v) {
        vfloat xv[MT];
        AMNETS_UNROLL
        for (int m = 0; m < MT; ++m) xv[m] = simd::load(xk + (m0 + m) * ldx + v * kWidth);
        AMNETS_UNROLL
        for (int i = 0; i < IT; ++i) {
          vfloat w = load16(blk + i * B + v * kWidth);
          if (partial) w = keep_lanes_below(w, last_cols - v * kWidth);
          AMNETS_UNROLL
          for (int m = 0; m < MT; ++m) acc[i][m] += w * xv[m];
        }
      }
    }
    store_dots<B>(acc, p, y, r, i0, m0, rows);
  }
}

// ---------------------------------------------------------------------------------------------------
// forward, many rows: xt is x transposed and padded, tile-major: (Mp / 16, Kb*B, 16), `tile` floats a tile.

// Rows that go through the few-row kernel (fp32, and bf16 without AVX512-BF16) rather than a 16-row tile:
// a tile costs the same for 1 or 16 rows, the few-row kernel ~1/13 of a tile per row (4096x2048 b=32 on one
// AMD EPYC core, d = 0.1 / 0.25: 4 rows 0.090 / 0.220 ms, a tile 0.30 / 0.67 ms). So 8-12 rows, and the rows
// past the last full tile when at most 12 are left (M=17 paid two tiles), take the few-row kernel.
constexpr int64_t kDotRowsMax = 12;
// bf16 weights on AVX512-BF16: vdpbf16ps tiles from 8 rows; past the last full tile up to 4 rows few-row.
constexpr int64_t kDpbf16MinRows = 8, kDpbf16FewMax = 4;

// NT 16-row tiles of x from m0 against OW outputs of block row r at a time: each weight is broadcast once for NT
// FMAs. One tile x 16 outputs (16 accumulators) loads a weight per FMA; three tiles x 8 outputs (24 accumulators,
// 3 x vectors, the broadcast: 28 of AVX-512's 32 registers) take 48 rows from 45: 4096x2048 b=32 fp32, 1 Intel
// Xeon core, d=0.5: M=64 3.51 -> 3.14 ms, M=1024 64.7 -> 56.6 ms (76 GMAC/s; MKL's dense GEMM ~108). Write
// `scalar * vector` here, not splat(): the splat version ran at 40.
constexpr int kTriple = 3;

template <typename T, int B, int NT, int OW>
AMNETS_INLINE void forward_broadcast(const Problem& p, const T* values, const float* xt, int64_t tile, float* y,
                                     int64_t r, int64_t m0) {
  const int64_t rows = p.rows_in(r);
  const float* xtile = xt + m0 / kWidth * tile;
  for (int64_t i0 = 0; i0 < rows; i0 += OW) {
    vfloat acc[NT][OW] = {};
    for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) {
      const T* blk = values + k * B * B + i0 * B;
      prefetch_block<T, B>(p, values, k, r, i0, OW, OW * B * int64_t(sizeof(T)));  // this pass's slice
      const float* xk = xtile + p.col[k] * B * kWidth;
      const int64_t cols = p.cols_in(p.col[k]);  // never touch weights outside the logical matrix
      for (int64_t j = 0; j < cols; ++j) {
        vfloat xv[NT];
        AMNETS_UNROLL
        for (int t = 0; t < NT; ++t) xv[t] = simd::load(xk + t * tile + j * kWidth);
        AMNETS_UNROLL
        for (int i = 0; i < OW; ++i) {
          const float w = scalar(blk[i * B + j]);
          AMNETS_UNROLL
          for (int t = 0; t < NT; ++t) acc[t][i] += w * xv[t];
        }
      }
    }
    const int64_t outputs = std::min<int64_t>(OW, rows - i0);
    for (int t = 0; t < NT; ++t) {
      vfloat out[kWidth] = {};  // OW outputs, then zeros (16 x 16 for the transpose)
      AMNETS_UNROLL
      for (int i = 0; i < OW; ++i) out[i] = acc[t][i];
      const int64_t first = m0 + t * kWidth;
      simd::store_transposed(out, y + first * p.out_features + r * B + i0, p.out_features,
                             std::min<int64_t>(kWidth, p.rows - first), outputs);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_x[m, c*B + j] = sum over blocks k in block column c, rows i: W_k[i, j] grad_y[m, row_k*B + i]

struct ColumnIndex {  // the blocks of each block column: column-major view of the pattern
  std::vector<int64_t> start, block, row;
};

inline ColumnIndex column_index(const Problem& p) {
  ColumnIndex ci;
  ci.start.assign(p.block_cols + 1, 0);
  const int64_t nnzb = p.crow[p.block_rows];
  for (int64_t k = 0; k < nnzb; ++k) ++ci.start[p.col[k] + 1];
  for (int64_t c = 0; c < p.block_cols; ++c) ci.start[c + 1] += ci.start[c];
  ci.block.resize(nnzb);
  ci.row.resize(nnzb);
  std::vector<int64_t> fill(ci.start.begin(), ci.start.end() - 1);
  for (int64_t r = 0; r < p.block_rows; ++r) {
    for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) {
      const int64_t at = fill[p.col[k]]++;
      ci.block[at] = k;
      ci.row[at] = r;
    }
  }
  return ci;
}

// A column's blocks lie anywhere in `values` (one per block row that has one), so the hardware prefetchers
// cannot follow them: the first pass over a column asks for whole blocks kPrefetchBytes ahead in column order
// (past the column's end: the next column's first ones), into L2 (2 threads, 4 rotated 4096x2048 b=32 sets,
// d=0.5, 1 row, fp32: 0.8-1.05 ms without, 0.47 into L2, 0.77-0.85 into L1). bf16 blocks of 32 or 64 columns
// read their rows as even/odd column pairs (simd::load_pairs), accumulate in that order and put the lanes
// back in order once, at the end.
template <typename T, int B, int MT>
AMNETS_INLINE void grad_input_column(const Problem& p, const ColumnIndex& ci, const T* values, const float* gy,
                                     float* gx, int64_t c, int64_t m0) {
  constexpr int V = B / kWidth;
  constexpr int64_t block_bytes = B * B * int64_t(sizeof(T));
  constexpr int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / block_bytes);
  const int64_t nnzb = int64_t(ci.block.size());
  vfloat acc[MT][V] = {};
  for (int64_t at = ci.start[c]; at < ci.start[c + 1]; ++at) {
    if (m0 == 0 && at + ahead < nnzb) prefetch_span<kIntoL2>(values + ci.block[at + ahead] * B * B, block_bytes);
    const T* blk = values + ci.block[at] * B * B;
    const float* g = gy + ci.row[at] * B;
    const int64_t rows = p.rows_in(ci.row[at]);
    for (int64_t i = 0; i < rows; ++i) {
      vfloat w[V];
      if constexpr (kPairs<T, B>) {  // even and odd columns (put in order at the end)
        simd::load_row_pairs(blk + i * B, w);
      } else {
        AMNETS_UNROLL
        for (int v = 0; v < V; ++v) w[v] = load16(blk + i * B + v * kWidth);
      }
      AMNETS_UNROLL
      for (int m = 0; m < MT; ++m) {
        const float gm = g[(m0 + m) * p.out_features + i];
        AMNETS_UNROLL
        for (int v = 0; v < V; ++v) acc[m][v] += gm * w[v];
      }
    }
  }
  if constexpr (kPairs<T, B>) {
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m) simd::to_element_order(acc[m]);
  }
  const int64_t cols = p.cols_in(c);
  AMNETS_UNROLL
  for (int m = 0; m < MT; ++m) {
    float* out = gx + (m0 + m) * p.in_features + c * B;
    AMNETS_UNROLL
    for (int v = 0; v < V; ++v) {
      if ((v + 1) * kWidth <= cols) {
        simd::store(out + v * kWidth, acc[m][v]);
      } else {
        for (int64_t j = v * kWidth; j < cols; ++j) out[j] = acc[m][v][j - v * kWidth];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_values[k, i, j] = sum_m grad_y[m, row_k*B + i] x[m, col_k*B + j]; x and grad_y padded to whole
// blocks with zeros, so entries outside the logical matrix get 0.

// x or grad_y as the SDDMM reads it: entry (m, c*B + j) at data[c * block + m * ld + j]. Row-major (block = B,
// ld = the row) for few rows; for many, packed by block column (block = M*B, ld = B): a block's pass over m is
// then one contiguous stream, where row-major strides a page per row (4096x2048 b=32 fp32, 1 Intel Xeon core,
// d=0.5, M=1024: fwd+bwd 301 -> 192 ms, the weight gradient from 56% of it to 30%).
struct Strided {
  const float* data;
  int64_t ld, block;
};
constexpr int64_t kPackRows = 64;

template <typename T, int B>
AMNETS_INLINE void grad_values_block(const Problem& p, Strided gy, Strided x, T* gv, int64_t k, int64_t r) {
  constexpr int V = B / kWidth;
  constexpr int IT = kWidth / V;  // IT * V accumulators
  for (int64_t i0 = 0; i0 < B; i0 += IT) {
    vfloat acc[IT][V] = {};
    for (int64_t m = 0; m < p.rows; ++m) {
      const float* xm = x.data + p.col[k] * x.block + m * x.ld;
      const float* gm = gy.data + r * gy.block + m * gy.ld + i0;
      vfloat xv[V];
      AMNETS_UNROLL
      for (int v = 0; v < V; ++v) xv[v] = simd::load(xm + v * kWidth);
      AMNETS_UNROLL
      for (int i = 0; i < IT; ++i) {
        const float g = gm[i];
        AMNETS_UNROLL
        for (int v = 0; v < V; ++v) acc[i][v] += g * xv[v];
      }
    }
    AMNETS_UNROLL
    for (int i = 0; i < IT; ++i) {
      T* out = gv + k * B * B + (i0 + i) * B;
      AMNETS_UNROLL
      for (int v = 0; v < V; ++v) simd::store16(out + v * kWidth, acc[i][v]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Clone entry points: one per (kernel, weight dtype); the block size and row tile become template
// arguments below them so that the inner loops are fully unrolled in every ISA clone.

// Everything below a clone entry point is always_inline, so that it is compiled for that clone's ISA.

// Weights of the block rows a tile of x meets in turn: about what stays in L2 beside the tile (~d x 128 KB at
// K = 2048) while every tile passes over them. With one block row at a time every tile came from L3 again for
// each block row (4096x2048 b=32 fp32, 1 Intel Xeon core, M=1024, d=0.25: 40.4 ms, 35.4 with chunks).
constexpr int64_t kChunkBytes = 256 << 10;

// Block rows [r0, r1): 16-row tiles while more than kDotRowsMax rows are left (each tile over the block rows of a
// chunk of ~kChunkBytes of weights), then the few-row kernel.
template <typename T, int B>
AMNETS_INLINE void forward_block_rows(const Problem& p, const T* values, const float* x, int64_t ldx,
                                      const float* xt, int64_t tile, float* y, int64_t r0, int64_t r1) {
  const int64_t tiled = xt == nullptr ? 0 : (p.rows - kDotRowsMax + kWidth - 1) / kWidth * kWidth;  // rows in tiles
  constexpr int64_t kBlockBytes = int64_t(B) * B * sizeof(T);
  for (int64_t c0 = r0, c1 = r0; c0 < r1; c0 = c1) {
    for (c1 = c0 + 1; c1 < r1 && (p.crow[c1 + 1] - p.crow[c0]) * kBlockBytes <= kChunkBytes;) ++c1;
    int64_t m0 = 0;
    for (; m0 + kTriple * kWidth <= tiled; m0 += kTriple * kWidth)
      for (int64_t r = c0; r < c1; ++r) forward_broadcast<T, B, kTriple, 8>(p, values, xt, tile, y, r, m0);
    for (; m0 < tiled; m0 += kWidth)
      for (int64_t r = c0; r < c1; ++r) forward_broadcast<T, B, 1, kWidth>(p, values, xt, tile, y, r, m0);
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t m0 = tiled;
    for (; m0 + 4 <= p.rows; m0 += 4) forward_dot<T, B, 4>(p, values, x, ldx, y, r, m0);
    for (; m0 + 2 <= p.rows; m0 += 2) forward_dot<T, B, 2>(p, values, x, ldx, y, r, m0);
    for (; m0 < p.rows; ++m0) forward_dot<T, B, 1>(p, values, x, ldx, y, r, m0);
  }
}

template <typename T>
AMNETS_INLINE void dispatch_forward(const Problem& p, const T* values, const float* x, int64_t ldx,
                                    const float* xt, int64_t tile, float* y, int64_t r0, int64_t r1) {
  switch (p.block) {
    case 16: return forward_block_rows<T, 16>(p, values, x, ldx, xt, tile, y, r0, r1);
    case 32: return forward_block_rows<T, 32>(p, values, x, ldx, xt, tile, y, r0, r1);
    default: return forward_block_rows<T, 64>(p, values, x, ldx, xt, tile, y, r0, r1);
  }
}

template <typename T, int B>
AMNETS_INLINE void grad_input_block_column(const Problem& p, const ColumnIndex& ci, const T* values,
                                           const float* gy, float* gx, int64_t c) {
  constexpr int MT = B == 64 ? 4 : 8;
  int64_t m0 = 0;
  for (; m0 + MT <= p.rows; m0 += MT) grad_input_column<T, B, MT>(p, ci, values, gy, gx, c, m0);
  for (; m0 < p.rows; ++m0) grad_input_column<T, B, 1>(p, ci, values, gy, gx, c, m0);
}

template <typename T>
AMNETS_INLINE void dispatch_grad_input(const Problem& p, const ColumnIndex& ci, const T* values, const float* gy,
                                       float* gx, int64_t c) {
  switch (p.block) {
    case 16: return grad_input_block_column<T, 16>(p, ci, values, gy, gx, c);
    case 32: return grad_input_block_column<T, 32>(p, ci, values, gy, gx, c);
    default: return grad_input_block_column<T, 64>(p, ci, values, gy, gx, c);
  }
}

template <typename T>
AMNETS_INLINE void dispatch_grad_values(const Problem& p, Strided gy, Strided x, T* gv, int64_t k, int64_t r) {
  switch (p.block) {
    case 16: return grad_values_block<T, 16>(p, gy, x, gv, k, r);
    case 32: return grad_values_block<T, 32>(p, gy, x, gv, k, r);
    default: return grad_values_block<T, 64>(p, gy, x, gv, k, r);
  }
}

// The entry points, per weight dtype (bsr_f32.cpp, bsr_bf16.cpp): block rows [r0, r1) of y from x (or its
// transposed tiles xt), block columns [c0, c1) of grad_x, blocks [k0, k1) of grad_values.
void forward_rows(const Problem& p, const float* v, const float* x, int64_t ldx, const float* xt, int64_t tile,
                  float* y, int64_t r0, int64_t r1);
void forward_rows(const Problem& p, const c10::BFloat16* v, const float* x, int64_t ldx, const float* xt,
                  int64_t tile, float* y, int64_t r0, int64_t r1);
void grad_input_columns(const Problem& p, const ColumnIndex& ci, const float* v, const float* gy, float* gx,
                        int64_t c0, int64_t c1);
void grad_input_columns(const Problem& p, const ColumnIndex& ci, const c10::BFloat16* v, const float* gy,
                        float* gx, int64_t c0, int64_t c1);
void grad_values_blocks(const Problem& p, Strided gy, Strided x, float* gv, const int64_t* row_of, int64_t k0,
                        int64_t k1);
void grad_values_blocks(const Problem& p, Strided gy, Strided x, c10::BFloat16* gv, const int64_t* row_of,
                        int64_t k0, int64_t k1);

// Defines the entry points for weights of type T: each a thin wrapper of a function compiled per instruction
// set (AMNETS_CLONES, simd.h) that dispatches on the block size.
#define AMNETS_BSR_KERNELS(T, NAME)                                                                           \
  namespace {                                                                                                 \
  AMNETS_CLONES void forward_##NAME(const Problem& p, const T* v, const float* x, int64_t ldx,               \
                                    const float* xt, int64_t tile, float* y, int64_t r0, int64_t r1) {         \
    dispatch_forward<T>(p, v, x, ldx, xt, tile, y, r0, r1);                                                 \
  }                                                                                                            \
  AMNETS_CLONES void grad_input_##NAME(const Problem& p, const ColumnIndex& ci, const T* v, const float* gy,   \
                                       float* gx, int64_t c0, int64_t c1) {                                   \
    for (int64_t c = c0; c < c1; ++c) dispatch_grad_input<T>(p, ci, v, gy, gx, c);                          \
  }                                                                                                            \
  AMNETS_CLONES void grad_values_##NAME(const Problem& p, Strided gy, Strided x, T* gv, const int64_t* row_of, \
                                        int64_t k0, int64_t k1) {                                             \
    for (int64_t k = k0; k < k1; ++k) dispatch_grad_values<T>(p, gy, x, gv, k, row_of[k]);                  \
  }                                                                                                            \
  }                                                                                                            \
  void forward_rows(const Problem& p, const T* v, const float* x, int64_t ldx, const float* xt, int64_t tile, \
                    float* y, int64_t r0, int64_t r1) {                                                       \
    forward_##NAME(p, v, x, ldx, xt, tile, y, r0, r1);                                                       \
  }                                                                                                            \
  void grad_input_columns(const Problem& p, const ColumnIndex& ci, const T* v, const float* gy, float* gx,     \
                          int64_t c0, int64_t c1) {                                                           \
    grad_input_##NAME(p, ci, v, gy, gx, c0, c1);                                                              \
  }                                                                                                            \
  void grad_values_blocks(const Problem& p, Strided gy, Strided x, T* gv, const int64_t* row_of, int64_t k0, \
                          int64_t k1) {                                                                        \
    grad_values_##NAME(p, gy, x, gv, row_of, k0, k1);                                                         \
  }

}  // namespace amnets::cpu::bsr_kernels
