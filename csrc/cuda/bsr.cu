// CUDA face of bsr_linear (contract: amnets_kernels/_ops/bsr.py; math: amnets_kernels/reference/bsr.py;
// the CPU face csrc/cpu/bsr.cpp is the same design on SIMD lanes).
//
// y = x @ W^T + bias with W (N, K) stored as BSR blocks: block row r holds blocks crow[r]..crow[r+1]-1 of
// values (nnzb, b, b), each row-major at block column col[k]. The stored layout is used as it is (no
// repacking), so a weight that changes every step (training) costs nothing extra.
//
// Kernels. Fast ones for float32 / float16 / bfloat16 and b in {16, 32, 64}; all accumulate in fp32.
//   forward, M <= 16 rows         forward_rows_kernel: memory-bound streaming inference. One warp per
//     (the target)                (block row, slice of its rows); lane = 16-byte slice of one block row,
//                                 so a warp reads 512 contiguous weight bytes per block with one load per
//                                 lane, 2 to 8 blocks loaded before the first use; x slices come through
//                                 L1 (every warp re-reads them; the weights skip L1); per-row dot products
//                                 in fp32 registers, reduced by warp shuffles. All M rows in one pass
//                                 (compiled for 1, 2, 4, 8, 16 rows), so the weights are read exactly once.
//                                 Optionally (AMNETS_BSR_CUDA_SPLIT, see split_rows) a CTA's 4 warps share
//                                 one slice and split its blocks: 4x the loads in flight for small grids.
//   forward, M > 16 rows          tile_kernel<forward>: CTA per (block row, 64-row tile of x); each stored
//                                 block and its x slice staged in shared memory as fp32, 4 x b/16 outputs
//                                 per thread by plain FMA. Weights read once per 64 rows.
//   grad_x = grad_y @ W           tile_kernel<!forward>: the same kernel per (block column, 64-row tile)
//                                 over a column-major index built on the device (stable argsort of
//                                 col_indices: each column's blocks in block-row order), once per
//                                 pattern (csrc/pattern_cache.h), not per call.
//   grad_values (SDDMM)           grad_values_kernel: CTA per stored block, grad_y[:, rows]^T x[:, cols]
//                                 accumulated over 64-row tiles staged in shared memory.
// Everything else (float64, other block sizes such as 1 and 4): generic_*_kernel, one thread per output
// element with the block size a run-time value, accumulating in float (double for float64). Exact, not
// fast; the Python op says so (amnets_kernels/_ops/bsr.py), like for the CPU face.
//
// No atomics anywhere: every output element is summed by one thread in a fixed order (deterministic).
// Padding: the logical (N, K) need not be whole blocks. Block entries outside it are never used (they
// may hold inf/NaN: they are replaced by 0 with a select, never multiplied by 0), and grad_values there
// is exactly 0.
// Limits: N, K, nnzb below 2^31 (checked); large-M forward and backward use FMA tiles, not tensor cores
// (correct and simple; an mma/wgmma tile is the next step for training-size M).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../pattern_cache.h"

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace amnets::cuda {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------
// 16-byte weight and activation vectors, widened to fp32.

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte load: 4 fp32, 8 fp16/bf16

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kVec<T>]);

template <>
__device__ __forceinline__ void unpack<float>(const uint4& raw, float (&out)[4]) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

template <>
__device__ __forceinline__ void unpack<at::BFloat16>(const uint4& raw, float (&out)[8]) {
  const uint32_t word[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {  // little endian: element 2e is the low half of word e
    out[2 * e] = __uint_as_float(word[e] << 16);
    out[2 * e + 1] = __uint_as_float(word[e] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void unpack<at::Half>(const uint4& raw, float (&out)[8]) {
  const uint32_t word[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    out[2 * e] = __half2float(__ushort_as_half(static_cast<unsigned short>(word[e] & 0xffffu)));
    out[2 * e + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word[e] >> 16)));
  }
}

// Weights are read once per call: ld.global.cg caches them in L2 only, so that L1 holds x, which every
// warp re-reads. L2 allocation stays normal: a model whose weights fit in L2 keeps them there across
// calls. (A plain intrinsic, not inline PTX: the compiler knows it is a load and never hoists it out
// of the bounds check around it.)
__device__ __forceinline__ uint4 load_weights(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ uint4 load_cached(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// ---------------------------------------------------------------------------------------------------
// forward, few rows: y[m, r*B + i] = sum_k sum_j W_k[i, j] x[m, col_k*B + j] + bias

constexpr int kRowsThreads = 128;  // 4 warps per CTA: small CTAs spread a small grid over more SMs
constexpr int kMaxWarpRows = 16;   // M above this takes the tiled kernel

template <typename T, int B, int MT, int S>
struct RowsLayout {
  static constexpr int kLanesPerRow = B / kVec<T>;              // lanes covering one row of a block
  static constexpr int kRowsPerWarp = kWarp / kLanesPerRow;     // block rows i one warp load covers
  static constexpr int kWarpsPerBlockRow = B / kRowsPerWarp;
  // Blocks loaded before the first is used: enough weight bytes in flight per SM to cover DRAM
  // latency with few warps; fewer as the MT accumulators and x vectors take the registers. Split (S > 1):
  // half as many, each warp having a quarter of the blocks, and the registers freed go to more warps an SM.
  static constexpr int kUnroll = S > 1 ? (MT <= 2 ? 4 : 2) : MT <= 4 ? 8 : MT == 8 ? 4 : 2;
  // M = 1 (streaming, one x load per block): the x loads of all kUnroll blocks are issued together
  // too, else their latencies add up one after another. With more rows each block already has MT x
  // loads in flight, and kUnroll x MT of them at once would not fit in the registers: there a branch
  // per block keeps the compiler from hoisting them all.
  static constexpr bool kAllXTogether = MT == 1;
  // CTAs per SM the kernel is compiled for, which caps its registers at 65536 / (128 n), in units of
  // 8: 96 for M = 1 (kUnroll x loads in flight), 80 for MT = 2, 128 for MT >= 4 (the MT x loads of a
  // block in flight together). 16 to 24 warps per SM, each with kUnroll x 512 weight bytes in flight.
  // Split: 64 registers for MT <= 2 (32 warps an SM), 80 for MT = 4 and 8.
  static constexpr int kMinBlocks = S > 1 ? (MT <= 2 ? 8 : MT <= 8 ? 6 : 4) : MT == 1 ? 5 : MT == 2 ? 6 : 4;
  static_assert(kLanesPerRow >= 1 && kLanesPerRow <= kWarp && kWarp % kLanesPerRow == 0, "lane layout");
  static_assert(B % kRowsPerWarp == 0, "whole warps per block row");
};

// acc[m] += W row slice . x[m] slice for one stored block. c0: the logical column of the lane's first
// element; x rows are ldx apart and either K % kVec == 0 or x is padded with zeros (see forward_fast).
// live: the block exists and the slice starts inside in_features (else its x is not read).
// Branch-free on purpose: selects and predicated loads only, so that a caller may run it for dead
// blocks too and the compiler can issue the x loads of several blocks back to back (kAllXTogether).
template <typename T, int MT>
__device__ __forceinline__ void dot_block(const uint4& raw, int c0, bool live, int K, const T* __restrict__ x,
                                          int64_t ldx, int M, float (&acc)[MT]) {
  constexpr int V = kVec<T>;
  float w[V];
  unpack<T>(raw, w);
  // Entries past in_features (the last, partial block column) may hold inf/NaN: select them away,
  // never multiply them by zero.
#pragma unroll
  for (int e = 0; e < V; ++e) w[e] = c0 + e < K ? w[e] : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    uint4 raw_x = make_uint4(0, 0, 0, 0);  // rows past M and dead slices: zeros, so 0 * 0 is added
    if (live && m < M) raw_x = load_cached(x + m * ldx + c0);
    float xv[V];
    unpack<T>(raw_x, xv);
#pragma unroll
    for (int e = 0; e < V; ++e) acc[m] = fmaf(w[e], xv[e], acc[m]);
  }
}

// S: warps sharing one (block row, slice of its rows). S = 1: a warp walks the block row's blocks alone. S = 4
// (the whole CTA): warp s takes blocks s, s + 4, ... and the four partial sums meet in shared memory, in a fixed
// order. A small grid (few block rows: one layer of a streaming model) then has 4x the warps, hence 4x the
// weight bytes in flight, and each warp a quarter of the dependent load rounds (col, then x) it walked alone.
template <typename T, int B, int MT, int S>
__global__ void __launch_bounds__(kRowsThreads, (RowsLayout<T, B, MT, S>::kMinBlocks))
    forward_rows_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values,
                        const int* __restrict__ crow, const int* __restrict__ col, const T* __restrict__ bias,
                        T* __restrict__ y, int M, int N, int K) {
  using L = RowsLayout<T, B, MT, S>;
  constexpr int U = L::kUnroll;
  constexpr int kCtaWarps = kRowsThreads / kWarp;
  // S = kCtaWarps: a CTA is one slice, so the exit below is uniform over it and its __syncthreads is safe.
  static_assert(S == 1 || S == kCtaWarps, "split over one warp or the whole CTA");
  const int lane = threadIdx.x % kWarp, s = S == 1 ? 0 : int(threadIdx.x / kWarp);
  const int64_t slice = (int64_t(blockIdx.x) * kRowsThreads + threadIdx.x) / kWarp / S;
  const int64_t r = slice / L::kWarpsPerBlockRow;
  const int first_i = int(slice % L::kWarpsPerBlockRow) * L::kRowsPerWarp;
  // Warp-uniform exit (no lane of it is needed by a shuffle): rows all past out_features, which
  // includes the warps past the last block row.
  if (r * B + first_i >= N) return;
  const int i = first_i + lane / L::kLanesPerRow;  // this lane's row in the block
  const int j0 = (lane % L::kLanesPerRow) * kVec<T>;  // and its first column

  float acc[MT] = {};
  const int k_end = crow[r + 1];
  for (int k0 = crow[r] + s; k0 < k_end; k0 += U * S) {  // this warp's blocks: k0, k0 + S, ..., k0 + (U - 1) S
    uint4 w[U];
    int c[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all U loads issued before the first is used
      const int k = k0 + u * S;
      w[u] = make_uint4(0, 0, 0, 0);
      c[u] = 0;
      if (k < k_end) {
        c[u] = col[k];
        w[u] = load_weights(values + (int64_t(k) * B + i) * B + j0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {  // a missing block (past k_end) has w = 0 and is not live
      const int c0 = c[u] * B + j0;
      const bool live = k0 + u * S < k_end && c0 < K;
      if (L::kAllXTogether || live) dot_block<T, MT>(w[u], c0, live, K, x, ldx, M, acc);
    }
  }

  // Sum the kLanesPerRow partial dot products of each row. The xor butterfly leaves the same sum in
  // every lane of the row (each step adds the same two numbers), so the stores can be spread over them.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int off = L::kLanesPerRow / 2; off > 0; off /= 2) acc[m] += __shfl_xor_sync(kFullMask, acc[m], off);
  // The lane that stores row m's output: the spread above.
  const auto stores = [&](int m) { return m < M && m % L::kLanesPerRow == lane % L::kLanesPerRow; };
  if constexpr (S > 1) {
    __shared__ float partial[S][MT][L::kRowsPerWarp];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (stores(m)) partial[s][m][i - first_i] = acc[m];
    __syncthreads();
    if (s != 0) return;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (!stores(m)) continue;
      float sum = partial[0][m][i - first_i];
#pragma unroll
      for (int t = 1; t < S; ++t) sum += partial[t][m][i - first_i];
      acc[m] = sum;
    }
  }

  const int64_t n = r * B + i;
  if (n >= N) return;  // rows past out_features (their weights may be NaN; never stored)
  const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (stores(m)) y[m * int64_t(N) + n] = static_cast<T>(acc[m] + b);
  }
}

// ---------------------------------------------------------------------------------------------------
// Shared-memory tiles: forward for many rows, grad_x, grad_values.

constexpr int kTileThreads = 256;  // 16 x 16 threads
constexpr int kTileRows = 64;      // rows of x / grad_y per tile: 4 per thread
// CTAs per SM the tile kernels are compiled for: caps registers at 80 (65536 / 768 = 85, in units of
// 8). Without a minimum, ptxas aims for 4 CTAs (64 registers) and spills the b = 64 fp16 tile.
constexpr int kTileMinBlocks = 3;

// dst[mm][kk] = src[(row0 + mm) * ld + col0 + kk] as fp32, 0 for rows >= rows or kk >= valid (past the
// logical matrix: never read there, so no out-of-bounds access and no NaN from padding).
template <typename T, int B>
__device__ __forceinline__ void stage_rows(float (*dst)[B + 1], const T* __restrict__ src, int64_t ld, int64_t row0,
                                           int64_t rows, int64_t col0, int valid) {
  for (int e = threadIdx.x; e < kTileRows * B; e += kTileThreads) {
    const int mm = e / B, kk = e % B;  // consecutive threads read consecutive columns
    float v = 0.f;
    if (row0 + mm < rows && kk < valid) v = static_cast<float>(src[(row0 + mm) * ld + col0 + kk]);
    dst[mm][kk] = v;
  }
}

// The stored blocks feeding each output line (a block row of y, or a block column of grad_x).
struct Lines {
  const int* start;   // entries of line l: start[l] .. start[l + 1] - 1
  const int* block;   // the stored block of each entry; nullptr: the entry number itself (CSR order)
  const int* source;  // the block index, along A's columns, of the A slice each entry multiplies
};

// C[m, line*B + n] = sum over the line's entries e of sum_kk A[m, source_e*B + kk] Wop[kk][n] (+ bias),
//   forward: A = x (M, K), Wop[kk][n] = W_k[n][kk] (W transposed), C = y (M, N);
//   grad_x:  A = grad_y (M, N), Wop[kk][n] = W_k[kk][n], C = grad_x (M, K).
// kk past the logical matrix is zeroed in both A and Wop (select); n past it is computed but not stored.
// One CTA per (line, tile of kTileRows rows), the row tiles of a line adjacent in the grid so that
// they run together and share the line's weights in L2.
template <typename T, int B, bool kForward>
__global__ void __launch_bounds__(kTileThreads, kTileMinBlocks)
    tile_kernel(const T* __restrict__ a, int a_width, const T* __restrict__ values, Lines lines,
                const T* __restrict__ bias, T* __restrict__ c, int c_width, int64_t M, int64_t row_tiles) {
  constexpr int RM = kTileRows / 16, RN = B / 16;
  // One padding column: the transposed weight store and the two-row A reads hit distinct banks.
  __shared__ float a_s[kTileRows][B + 1];
  __shared__ float w_s[B][B + 1];
  const int64_t line = blockIdx.x / row_tiles;
  const int64_t row0 = (blockIdx.x % row_tiles) * kTileRows;
  const int tn = threadIdx.x % 16, tm = threadIdx.x / 16;  // outputs (tm + 16q, tn + 16s)

  float acc[RM][RN] = {};
  const int e_end = lines.start[line + 1];
  for (int e = lines.start[line]; e < e_end; ++e) {
    const int64_t k = lines.block != nullptr ? lines.block[e] : e;
    const int src = lines.source[e];
    const int valid = min(B, a_width - src * B);  // contraction entries inside the logical matrix
    stage_rows<T, B>(a_s, a, a_width, row0, M, int64_t(src) * B, valid);
    const T* blk = values + k * B * B;
    for (int idx = threadIdx.x; idx < B * B; idx += kTileThreads) {
      const int i = idx / B, j = idx % B;  // W_k[i][j], read along j (coalesced)
      const int kk = kForward ? j : i, n = kForward ? i : j;
      w_s[kk][n] = kk < valid ? static_cast<float>(blk[idx]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < B; ++kk) {
      float av[RM], wv[RN];
#pragma unroll
      for (int q = 0; q < RM; ++q) av[q] = a_s[tm + 16 * q][kk];
#pragma unroll
      for (int s = 0; s < RN; ++s) wv[s] = w_s[kk][tn + 16 * s];
#pragma unroll
      for (int q = 0; q < RM; ++q)
#pragma unroll
        for (int s = 0; s < RN; ++s) acc[q][s] = fmaf(av[q], wv[s], acc[q][s]);
    }
    __syncthreads();  // before the next entry overwrites the tiles
  }

  const int out_valid = int(min(int64_t(B), c_width - line * B));
#pragma unroll
  for (int s = 0; s < RN; ++s) {
    const int n = tn + 16 * s;
    if (n >= out_valid) continue;
    const float b = bias != nullptr ? static_cast<float>(bias[line * B + n]) : 0.f;
#pragma unroll
    for (int q = 0; q < RM; ++q) {
      const int64_t m = row0 + tm + 16 * q;
      if (m < M) c[m * c_width + line * B + n] = static_cast<T>(acc[q][s] + b);
    }
  }
}

// grad_values[k][i][j] = sum_m grad_y[m, row_k*B + i] x[m, col_k*B + j], exactly 0 outside the logical
// matrix. One CTA per stored block, looping over all rows in tiles.
template <typename T, int B>
__global__ void __launch_bounds__(kTileThreads, kTileMinBlocks)
    grad_values_kernel(const T* __restrict__ gy, const T* __restrict__ x, const int* __restrict__ row_of,
                       const int* __restrict__ col, T* __restrict__ gv, int64_t M, int N, int K) {
  constexpr int RB = B / 16;
  __shared__ float g_s[kTileRows][B + 1];
  __shared__ float x_s[kTileRows][B + 1];
  const int64_t k = blockIdx.x;
  const int r = row_of[k], cb = col[k];
  const int rows = min(B, N - r * B), cols = min(B, K - cb * B);
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;  // outputs (ti + 16p, tj + 16q)

  float acc[RB][RB] = {};
  for (int64_t row0 = 0; row0 < M; row0 += kTileRows) {
    stage_rows<T, B>(g_s, gy, N, row0, M, int64_t(r) * B, rows);
    stage_rows<T, B>(x_s, x, K, row0, M, int64_t(cb) * B, cols);
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < kTileRows; ++mm) {
      float gv_[RB], xv[RB];
#pragma unroll
      for (int p = 0; p < RB; ++p) gv_[p] = g_s[mm][ti + 16 * p];
#pragma unroll
      for (int q = 0; q < RB; ++q) xv[q] = x_s[mm][tj + 16 * q];
#pragma unroll
      for (int p = 0; p < RB; ++p)
#pragma unroll
        for (int q = 0; q < RB; ++q) acc[p][q] = fmaf(gv_[p], xv[q], acc[p][q]);
    }
    __syncthreads();
  }

  T* out = gv + k * B * B;
#pragma unroll
  for (int p = 0; p < RB; ++p) {
    const int i = ti + 16 * p;
#pragma unroll
    for (int q = 0; q < RB; ++q) {
      const int j = tj + 16 * q;
      // A select, so that even an inf in x cannot make a padding gradient non-zero.
      out[i * B + j] = static_cast<T>(i < rows && j < cols ? acc[p][q] : 0.f);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Generic kernels (any dtype, any block size): one thread per output element, valid entries only.

constexpr int kGenericThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kGenericThreads)
    generic_forward_kernel(const T* __restrict__ x, const T* __restrict__ values, const int* __restrict__ crow,
                           const int* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                           int N, int K, int B) {
  using Acc = at::opmath_type<T>;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < M * N;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N;
    const int n = int(idx % N), r = n / B, i = n % B;
    Acc acc = 0;
    for (int k = crow[r]; k < crow[r + 1]; ++k) {
      const int cb = col[k], cols = min(B, K - cb * B);
      const T* w = values + (int64_t(k) * B + i) * B;
      const T* xm = x + m * K + int64_t(cb) * B;
      for (int j = 0; j < cols; ++j) acc += static_cast<Acc>(w[j]) * static_cast<Acc>(xm[j]);
    }
    if (bias != nullptr) acc += static_cast<Acc>(bias[n]);
    y[idx] = static_cast<T>(acc);
  }
}

// grad_x[m, c*B + j] = sum over the blocks of block column c (column index: start/block/row) of
// sum_i W_k[i][j] grad_y[m, row*B + i].
template <typename T>
__global__ void __launch_bounds__(kGenericThreads)
    generic_grad_x_kernel(const T* __restrict__ gy, const T* __restrict__ values, const int* __restrict__ start,
                          const int* __restrict__ block, const int* __restrict__ row, T* __restrict__ gx,
                          int64_t M, int N, int K, int B) {
  using Acc = at::opmath_type<T>;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < M * K;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = idx / K;
    const int kc = int(idx % K), cb = kc / B, j = kc % B;
    Acc acc = 0;
    for (int e = start[cb]; e < start[cb + 1]; ++e) {
      const int r = row[e], rows = min(B, N - r * B);
      const T* w = values + int64_t(block[e]) * B * B + j;
      const T* g = gy + m * N + int64_t(r) * B;
      for (int i = 0; i < rows; ++i) acc += static_cast<Acc>(w[int64_t(i) * B]) * static_cast<Acc>(g[i]);
    }
    gx[idx] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kGenericThreads)
    generic_grad_values_kernel(const T* __restrict__ gy, const T* __restrict__ x, const int* __restrict__ row_of,
                               const int* __restrict__ col, T* __restrict__ gv, int64_t nnzb, int64_t M, int N,
                               int K, int B) {
  using Acc = at::opmath_type<T>;
  const int64_t bb = int64_t(B) * B;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < nnzb * bb;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = idx / bb;
    const int i = int(idx % bb) / B, j = int(idx % bb) % B;
    const int r = row_of[k], cb = col[k];
    Acc acc = 0;
    if (i < N - r * B && j < K - cb * B) {  // else the entry lies past the logical matrix: exactly 0
      const T* g = gy + int64_t(r) * B + i;
      const T* xm = x + int64_t(cb) * B + j;
      for (int64_t m = 0; m < M; ++m) acc += static_cast<Acc>(g[m * N]) * static_cast<Acc>(xm[m * K]);
    }
    gv[idx] = static_cast<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side

// Every launch: on the current stream, checked; an empty grid launches nothing.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, Args&&... args) {
  if (blocks <= 0) return;
  TORCH_CHECK(blocks <= INT_MAX, "amnets bsr_linear cuda face: problem too large (", blocks, " CUDA blocks)");
  kernel<<<dim3(unsigned(blocks)), dim3(threads), 0, at::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels: enough CTAs to fill the GPU, never more than the work.
int64_t generic_blocks(int64_t work) { return std::min<int64_t>(ceil_div(work, kGenericThreads), 1 << 16); }

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mutable_ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// The call's sizes, checked to fit the kernels' int arithmetic.
struct Problem {
  int64_t M;
  int N, K, B, Nb, Kb;
  int64_t nnzb;
};

Problem problem_of(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                   int64_t out_features, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "amnets bsr_linear cuda face: x must be (M, in_features)");
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2) && values.size(1) >= 1,
              "amnets bsr_linear cuda face: values must be (nnzb, b, b)");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "amnets bsr_linear cuda face: values and x dtypes differ");
  for (const Tensor* t : {&values, &crow, &col})
    TORCH_CHECK(t->device() == x.device(), "amnets bsr_linear cuda face: all tensors must be on x's device");
  const int64_t b = values.size(1), nb = ceil_div(out_features, b), kb = ceil_div(in_features, b);
  TORCH_CHECK(out_features >= 1 && in_features >= 1 && nb * b < INT_MAX && kb * b < INT_MAX &&
                  values.size(0) < INT_MAX,
              "amnets bsr_linear cuda face: sizes must be positive and below 2^31");
  TORCH_CHECK(crow.numel() == nb + 1 && col.numel() == values.size(0),
              "amnets bsr_linear cuda face: crow_indices must have ceil(out_features / b) + 1 entries and "
              "col_indices nnzb");
  return {x.size(0), int(out_features), int(in_features), int(b), int(nb), int(kb), values.size(0)};
}

bool has_fast_path(const Tensor& values) {
  const int64_t b = values.size(1);
  const auto t = values.scalar_type();
  return (b == 16 || b == 32 || b == 64) && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16);
}

// Index arrays arrive int32 or int64; the kernels read int32.
Tensor int32_indices(const Tensor& t) { return t.to(at::kInt).contiguous(); }

template <typename F>
void with_block_size(int b, F&& f) {
  switch (b) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: TORCH_CHECK(false, "amnets bsr_linear cuda face: no fast kernel for block size ", b);
  }
}

template <typename F>
void with_rows_tile(int64_t m, F&& f) {  // the smallest compiled row count that holds m <= kMaxWarpRows
  if (m <= 1) return f(std::integral_constant<int, 1>{});
  if (m <= 2) return f(std::integral_constant<int, 2>{});
  if (m <= 4) return f(std::integral_constant<int, 4>{});
  if (m <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, kMaxWarpRows>{});
}

#define AMNETS_DISPATCH_FAST_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// The block row of every stored block, int32 (nnzb,): no host sync (the output size is given).
Tensor block_rows_of(const Tensor& crow, int64_t nnzb) {
  // The optional<int64_t> spells out the overload: repeat_interleave(repeats, output_size), not
  // repeat_interleave(self, int repeats).
  return at::repeat_interleave(crow.diff().to(at::kLong), std::optional<int64_t>(nnzb)).to(at::kInt);
}

// Column-major view of the pattern: the entries of block column c are start[c] .. start[c+1]-1, each a
// stored block and its block row. A stable sort keeps each column's blocks in block-row order, so the
// sums run in a fixed order (deterministic results). All on the device, no host sync.
struct ColumnIndex {
  Tensor start, block, row;
};

ColumnIndex column_index(const Tensor& col, const Tensor& row_of, int64_t kb) {
  const auto [sorted, order] = at::sort(col.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor columns = at::arange(kb + 1, sorted.options());
  return {at::searchsorted(sorted, columns, /*out_int32=*/true, /*right=*/false).contiguous(),
          order.to(at::kInt).contiguous(), row_of.index_select(0, order).contiguous()};
}

// A fresh (hence 16-byte aligned) copy of x with width columns, zeros past in_features.
Tensor padded_copy(const Tensor& x, int64_t width) {
  Tensor out = at::zeros({x.size(0), width}, x.options());
  out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

// Whether the few-row forward splits each block row's blocks over a CTA's warps (forward_rows_kernel's S):
// AMNETS_BSR_CUDA_SPLIT = off (the default until a GPU has timed it: written 2026-12-05 without one), on, or
// auto (when the unsplit grid, `slices` warps, would leave the GPU under 16 warps an SM).
bool split_rows(int64_t slices) {
  const char* env = std::getenv("AMNETS_BSR_CUDA_SPLIT");
  const std::string value = env == nullptr || *env == '\0' ? "off" : env;
  TORCH_CHECK_VALUE(value == "off" || value == "on" || value == "auto",
                    "bsr_linear (cuda): AMNETS_BSR_CUDA_SPLIT must be off, on or auto; got '", value, "'");
  if (value != "auto") return value == "on";
  return slices < int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
}

template <typename T, int B>
void forward_fast(const Problem& p, const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                  const Tensor& bias, const Tensor& y) {
  if (p.M <= kMaxWarpRows && aligned16(values)) {
    // 16-byte x loads need K % kVec == 0 and an aligned x; otherwise x is copied (M <= 16 rows: cheap).
    const bool x_ok = p.K % kVec<T> == 0 && aligned16(x);
    const Tensor xs = x_ok ? x : padded_copy(x, int64_t(p.Kb) * B);
    with_rows_tile(p.M, [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      const int64_t slices = int64_t(p.Nb) * RowsLayout<T, B, MT, 1>::kWarpsPerBlockRow;  // the same for any S
      const auto go = [&](auto kernel, int64_t warps) {
        launch(kernel, ceil_div(warps * kWarp, kRowsThreads), kRowsThreads, ptr<T>(xs), xs.size(1), ptr<T>(values),
               ptr<int>(crow), ptr<int>(col), ptr<T>(bias), mutable_ptr<T>(y), int(p.M), p.N, p.K);
      };
      constexpr int kSplit = kRowsThreads / kWarp;
      if (split_rows(slices)) {
        go(forward_rows_kernel<T, B, MT, kSplit>, slices * kSplit);
      } else {
        go(forward_rows_kernel<T, B, MT, 1>, slices);
      }
    });
    return;
  }
  const int64_t row_tiles = ceil_div(p.M, kTileRows);
  launch(tile_kernel<T, B, true>, p.Nb * row_tiles, kTileThreads, ptr<T>(x), p.K, ptr<T>(values),
         Lines{ptr<int>(crow), nullptr, ptr<int>(col)}, ptr<T>(bias), mutable_ptr<T>(y), p.N, p.M, row_tiles);
}

Tensor bsr_linear_forward(const Tensor& x_in, const Tensor& values_in, const Tensor& crow_indices,
                          const Tensor& col_indices, int64_t out_features, int64_t in_features,
                          const c10::optional<Tensor>& bias_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), values = values_in.contiguous();
  const Tensor crow = int32_indices(crow_indices), col = int32_indices(col_indices);
  const Problem p = problem_of(x, values, crow, col, out_features, in_features);
  Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.device() == x.device() && bias.scalar_type() == x.scalar_type() &&
                    bias.numel() == out_features,
                "amnets bsr_linear cuda face: bias must be (out_features,) like x");
  }
  Tensor y = at::empty({p.M, out_features}, x.options());
  if (p.M == 0) return y;
  if (!has_fast_path(values)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsr_linear_forward", [&] {
      launch(generic_forward_kernel<scalar_t>, generic_blocks(p.M * p.N), kGenericThreads, ptr<scalar_t>(x),
             ptr<scalar_t>(values), ptr<int>(crow), ptr<int>(col), ptr<scalar_t>(bias), mutable_ptr<scalar_t>(y),
             p.M, p.N, p.K, p.B);
    });
    return y;
  }
  AMNETS_DISPATCH_FAST_TYPES(x.scalar_type(), "bsr_linear_forward", [&] {
    with_block_size(p.B, [&](auto b) {
      forward_fast<scalar_t, decltype(b)::value>(p, x, values, crow, col, bias, y);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> bsr_linear_backward(const Tensor& grad_out, const Tensor& x_in, const Tensor& values_in,
                                               const Tensor& crow_indices, const Tensor& col_indices,
                                               int64_t out_features, int64_t in_features, bool need_x,
                                               bool need_values) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), values = values_in.contiguous(), gy = grad_out.contiguous();
  const Tensor crow = int32_indices(crow_indices), col = int32_indices(col_indices);
  const Problem p = problem_of(x, values, crow, col, out_features, in_features);
  TORCH_CHECK(gy.device() == x.device() && gy.scalar_type() == x.scalar_type() && gy.dim() == 2 &&
                  gy.size(0) == p.M && gy.size(1) == out_features,
              "amnets bsr_linear cuda face: grad_out must be (M, out_features) like x");
  Tensor grad_x = x.new_empty({0}), grad_values = values.new_empty({0});
  const bool fast = has_fast_path(values);
  // The block row of every block and the column-major order: built once per pattern (csrc/pattern_cache.h).
  std::vector<Tensor> derived{Tensor(), Tensor(), Tensor(), Tensor()};
  if (p.nnzb > 0 && (need_x || need_values)) {
    derived = pattern::derived("bsr_linear_backward cuda", crow_indices, col_indices, {p.nnzb, p.Kb}, [&] {
      const Tensor rows = block_rows_of(crow, p.nnzb);
      const ColumnIndex ci = column_index(col, rows, p.Kb);
      return std::vector<Tensor>{rows, ci.start, ci.block, ci.row};
    });
  }
  const Tensor& row_of = derived[0];

  if (need_x) {
    grad_x = at::empty({p.M, in_features}, x.options());
    if (p.M > 0 && p.nnzb == 0) grad_x.zero_();
    if (p.M > 0 && p.nnzb > 0) {
      const ColumnIndex ci{derived[1], derived[2], derived[3]};
      if (fast) {
        AMNETS_DISPATCH_FAST_TYPES(x.scalar_type(), "bsr_linear_backward", [&] {
          with_block_size(p.B, [&](auto b) {
            const int64_t row_tiles = ceil_div(p.M, kTileRows);
            launch(tile_kernel<scalar_t, decltype(b)::value, false>, p.Kb * row_tiles, kTileThreads,
                   ptr<scalar_t>(gy), p.N, ptr<scalar_t>(values),
                   Lines{ptr<int>(ci.start), ptr<int>(ci.block), ptr<int>(ci.row)}, nullptr,
                   mutable_ptr<scalar_t>(grad_x), p.K, p.M, row_tiles);
          });
        });
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsr_linear_backward", [&] {
          launch(generic_grad_x_kernel<scalar_t>, generic_blocks(p.M * p.K), kGenericThreads, ptr<scalar_t>(gy),
                 ptr<scalar_t>(values), ptr<int>(ci.start), ptr<int>(ci.block), ptr<int>(ci.row),
                 mutable_ptr<scalar_t>(grad_x), p.M, p.N, p.K, p.B);
        });
      }
    }
  }

  if (need_values) {
    grad_values = at::empty(values.sizes(), values.options());
    if (p.nnzb > 0) {  // M == 0 too: the kernels then write zeros
      if (fast) {
        AMNETS_DISPATCH_FAST_TYPES(x.scalar_type(), "bsr_linear_backward", [&] {
          with_block_size(p.B, [&](auto b) {
            launch(grad_values_kernel<scalar_t, decltype(b)::value>, p.nnzb, kTileThreads, ptr<scalar_t>(gy),
                   ptr<scalar_t>(x), ptr<int>(row_of), ptr<int>(col), mutable_ptr<scalar_t>(grad_values), p.M,
                   p.N, p.K);
          });
        });
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsr_linear_backward", [&] {
          launch(generic_grad_values_kernel<scalar_t>, generic_blocks(p.nnzb * p.B * p.B), kGenericThreads,
                 ptr<scalar_t>(gy), ptr<scalar_t>(x), ptr<int>(row_of), ptr<int>(col),
                 mutable_ptr<scalar_t>(grad_values), p.nnzb, p.M, p.N, p.K, p.B);
        });
      }
    }
  }
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(amnets_native, CUDA, m) {
  m.impl("bsr_linear_forward", &bsr_linear_forward);
  m.impl("bsr_linear_backward", &bsr_linear_backward);
}

}  // namespace amnets::cuda
