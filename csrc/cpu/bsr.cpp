// CPU face of bsr_linear (contract: amnets_kernels/_ops/bsr.py; math: amnets_kernels/reference/bsr.py).
//
// Layout: the BSR format as stored (values (nnzb, b, b), each block row-major, the blocks of a block
// row contiguous) is already the panel layout small-M inference wants: a block row's weights are one
// contiguous stream, read once. No repacking of the weights, so a weight that changes every step
// (training) costs nothing extra.
//
// Kernels (fp32 and bf16 weights, b in {16, 32, 64}; everything else takes a plain loop):
//   forward, few rows (M <= 12, and what is left past the last 16-row tile when at most 12 rows are):
//                               y[m, rows of r] = dot products of block rows with x, vectorised along
//                               the block's columns, up to 16 accumulators of (row i, input m); bf16 weights
//                               on AVX512-BF16 (blocks 32/64, fewer than 8 rows): the same on vdpbf16ps;
//   forward, many rows:         x is packed transposed once per call (tile-major: per 16 rows a K x 16
//                               stream) and each weight element is broadcast against 16 inputs at a time,
//                               48 (three tiles) from 45 rows (bf16 weights on AVX512-BF16: from 8 rows,
//                               vdpbf16ps on pairs of inputs);
//   grad_x = grad_y @ W:        by block column (a transposed index built per call), rows of a block
//                               broadcast-multiplied into 16-wide column accumulators;
//   grad_values (SDDMM):        per stored block, sum over m of grad_y[m, block rows] x[m, block cols]
//                               (from 64 rows x and grad_y packed by block column first);
//   on AMX (amx.h), bf16:       the many-row forward from 8 rows, grad_x and grad_values from 48, on tiles.
// The logical shape need not be whole blocks: block entries outside it are never used (masked),
// whatever they hold. Parallel over block rows / block columns / blocks with parallel_for (parallel.h: our
// pool, or OpenMP when autograd records the call); SIMD
// through csrc/cpu/simd.h (run-time ISA choice). The fp32/bf16 kernel templates are in bsr_kernels.h, compiled
// per weight dtype in bsr_f32.cpp and bsr_bf16.cpp; this file holds the AMX paths and the ops.

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "amx.h"
#include "bf16_convert.h"
#include "bsr_kernels.h"
#include "kernels.h"
#include "lstm_pointwise.h"
#include "lstm_stack.h"
#include "parallel.h"
#include "simd.h"

namespace amnets::cpu {
namespace {

using namespace bsr_kernels;  // the problem, the kernel templates, their per-dtype entry points

// ---------------------------------------------------------------------------------------------------
// bf16 weights, many rows, on a CPU with AVX512-BF16 (vdpbf16ps: 32 bf16 products into 16 fp32 lanes per
// instruction, twice an FMA's work; torch's dense bf16 GEMMs use it, so without it we would lose to them).
// xp holds x transposed in column pairs, (Kb*B/2, Mp, 2) bf16: lane m of pair row q is (x[m, 2q], x[m, 2q+1]);
// a weight pair (W[i, 2q], W[i, 2q+1]) is adjacent in a row-major block, so it is one 32-bit broadcast.
// x has the weights' dtype (the ops check it), so putting it in bf16 rounds nothing.

#ifdef AMNETS_HAVE_DPBF16

template <int B>
AMNETS_DPBF16 inline void forward_dpbf16_block_row(const Problem& p, const c10::BFloat16* values,
                                                   const uint16_t* xp, int64_t mp, float* y, int64_t r) {
  const auto* pairs = reinterpret_cast<const uint32_t*>(values);
  const int64_t rows = p.rows_in(r);
  for (int64_t m0 = 0; m0 < p.rows; m0 += 16) {
    const int64_t lanes = std::min<int64_t>(16, p.rows - m0);
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
      __m512 acc[16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) {
        const uint32_t* w = pairs + (k * B * B + i0 * B) / 2;
        // Whole blocks, into L2, in the first pass over the block row: the later passes (other 16 rows of the block)
        // find them there. Each pass asking for its own half-block slice left the DRAM stream in 1 KB pieces 2 KB
        // apart: 4096x2048 b=32 d=0.5 M=16 from DRAM, one AMD EPYC core, 0.96-0.97 -> 0.78-0.83 ms; 2 threads
        // 0.99-1.01 -> 0.76-0.86 ms; L3-resident unchanged (benchmarks/results/amd-epyc-bsr-bf16-prefetch-ab.log).
        if (i0 == 0) prefetch_block<c10::BFloat16, B>(p, values, k, r, 0, rows, B * B * 2);
        const uint16_t* xk = xp + (p.col[k] * B / 2 * mp + m0) * 2;
        // Never read weights outside the logical matrix (padding may hold anything): whole pairs up to the
        // last logical column, then a lone even column with its odd neighbour masked off.
        const int64_t cols = p.cols_in(p.col[k]), whole = cols / 2;
        for (int64_t q = 0; q < whole; ++q) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + q * mp * 2);
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(w[i * B / 2 + q]), xv);
        }
        if (cols & 1) {  // the low half of a pair is its even column
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + whole * mp * 2);
          for (int i = 0; i < 16; ++i)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(w[i * B / 2 + whole] & 0xFFFFu), xv);
        }
      }
      vfloat tile[16];
      for (int i = 0; i < 16; ++i) tile[i] = acc[i];
      simd::store_transposed(tile, y + m0 * p.out_features + r * B + i0, p.out_features, lanes,
                             std::min<int64_t>(16, rows - i0));
    }
  }
}

AMNETS_DPBF16 void forward_rows_dpbf16(const Problem& p, const c10::BFloat16* values, const uint16_t* xp,
                                       int64_t mp, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    switch (p.block) {
      case 16: forward_dpbf16_block_row<16>(p, values, xp, mp, y, r); break;
      case 32: forward_dpbf16_block_row<32>(p, values, xp, mp, y, r); break;
      default: forward_dpbf16_block_row<64>(p, values, xp, mp, y, r); break;
    }
  }
}

// bf16 weights, few rows (fewer than kDpbf16MinRows, or those past the last tile), blocks of 32 or 64: the few-row
// kernel's dot products along a block's columns (bsr_kernels.h forward_dot), on vdpbf16ps. x in bf16, in its own
// column order, meets a weight row's 32 bf16 as they lie: one load and one vdpbf16ps per (row, x row, 32 columns),
// where forward_dot widens the load into two float vectors and spends two FMAs on them. 4096x2048 b=32, one
// L3-resident set, one AMD EPYC core: d=0.5 M=2/4/7 0.21/0.42/0.80 -> 0.155/0.23/0.47 ms; streamed from DRAM
// unchanged (bound by the stream; benchmarks/results/amd-epyc-bsr-bf16-few-rows-ab.log).
template <int B, int MT>
AMNETS_DPBF16 inline void forward_dot_dpbf16(const Problem& p, const c10::BFloat16* values, const uint16_t* xb,
                                             int64_t ldx, float* y, int64_t r, int64_t m0) {
  static_assert(B % 32 == 0);
  constexpr int IT = kWidth / MT;  // weight rows a pass: IT * MT accumulators
  const int64_t rows = p.rows_in(r), last_col = p.block_cols - 1, last_cols = p.cols_in(last_col);
  const auto* w16 = reinterpret_cast<const uint16_t*>(values);
  for (int64_t i0 = 0; i0 < rows; i0 += IT) {
    vfloat acc[IT][MT] = {};
    for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) {
      prefetch_block<c10::BFloat16, B>(p, values, k, r, i0, IT, IT * B * 2);  // this pass's slice, as forward_dot
      const uint16_t* blk = w16 + k * B * B + i0 * B;
      const uint16_t* xk = xb + p.col[k] * B;
      // Never use weights outside the logical matrix (padding may hold anything): masked off past its last column.
      const int64_t cols = p.col[k] == last_col ? last_cols : B;
#pragma GCC unroll 2
      for (int v = 0; v < B / 32; ++v) {
        const int64_t left = cols - v * 32;
        const __mmask32 keep = left >= 32 ? ~__mmask32(0) : left <= 0 ? __mmask32(0) : (__mmask32(1) << left) - 1;
        __m512i xv[MT];
        for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_si512(xk + (m0 + m) * ldx + v * 32);
#pragma GCC unroll 16
        for (int i = 0; i < IT; ++i) {
          const __m512i w = _mm512_maskz_loadu_epi16(keep, blk + i * B + v * 32);
          for (int m = 0; m < MT; ++m) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)w, (__m512bh)xv[m]);
        }
      }
    }
    store_dots<B>(acc, p, y, r, i0, m0, rows);
  }
}

template <int B>
AMNETS_DPBF16 void dot_rows_dpbf16(const Problem& p, const c10::BFloat16* values, const uint16_t* xb, int64_t ldx,
                                   float* y, int64_t r) {
  int64_t m0 = 0;
  for (; m0 + 4 <= p.rows; m0 += 4) forward_dot_dpbf16<B, 4>(p, values, xb, ldx, y, r, m0);
  for (; m0 + 2 <= p.rows; m0 += 2) forward_dot_dpbf16<B, 2>(p, values, xb, ldx, y, r, m0);
  for (; m0 < p.rows; ++m0) forward_dot_dpbf16<B, 1>(p, values, xb, ldx, y, r, m0);
}

AMNETS_DPBF16 void forward_dots_dpbf16(const Problem& p, const c10::BFloat16* values, const uint16_t* xb, int64_t ldx,
                                       float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (p.block == 32) {
      dot_rows_dpbf16<32>(p, values, xb, ldx, y, r);
    } else {
      dot_rows_dpbf16<64>(p, values, xb, ldx, y, r);
    }
  }
}
#else
void forward_rows_dpbf16(const Problem&, const c10::BFloat16*, const uint16_t*, int64_t, float*, int64_t, int64_t) {}
void forward_dots_dpbf16(const Problem&, const c10::BFloat16*, const uint16_t*, int64_t, float*, int64_t, int64_t) {}
#endif

// C tile J (outputs 16J.. of a block, by the 16 rows from m0) into row-major y.
template <class Tiles, int J>
AMNETS_INLINE void store_c(float* y, int64_t ld, int64_t lanes, int64_t outputs) {
  if (outputs <= 0) return;  // past out_features
  alignas(64) float c[16][16];
  Tiles::template store<J>(c, 64);
  vfloat tile[16];
  for (int i = 0; i < 16; ++i) tile[i] = simd::load(c[i]);
  simd::store_transposed(tile, y, ld, lanes, std::min<int64_t>(16, outputs));
}

// The same tiles on AMX (amx.h): C (16 outputs i x 16 rows m of x) += W's rows i, read in place from the
// row-major block as the left operand (16 x 32 bf16), times xp's pair rows as the right one (xp's layout is
// the one TDPBF16PS wants: row q, column m holds (x[m, 2q], x[m, 2q + 1])), 8192 products an instruction.
// Tiles: C 0..B/16-1 (one per 16 outputs of a block), x 4, weights 5..7. A block in the last block column
// holds columns past in_features that may be anything (inf * 0 is NaN): it goes through a zeroed copy.
template <class Tiles, int B>
AMNETS_INLINE void forward_amx_block_row(const Problem& p, const c10::BFloat16* values, const uint16_t* xp,
                                         int64_t mp, float* y, int64_t r) {
  constexpr int kC = B / 16, kSteps = B > 32 ? 2 : 1, kDepth = B > 32 ? 32 : B;  // C tiles; k-steps of kDepth
  const int64_t rows = p.rows_in(r);
  c10::BFloat16 edge[B * B];
  for (int64_t m0 = 0; m0 < p.rows; m0 += 16) {
    amx::each<kC>([](auto j) { Tiles::template zero<j>(); });
    for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) {
      const c10::BFloat16* w = values + k * B * B;
      prefetch_block<c10::BFloat16, B>(p, values, k, r, 0, B, B * B * 2);
      if (const int64_t cols = p.cols_in(p.col[k]); cols < B) {
        for (int i = 0; i < B; ++i) {
          std::copy(w + i * B, w + i * B + cols, edge + i * B);
          std::fill(edge + i * B + cols, edge + (i + 1) * B, c10::BFloat16(0.f));
        }
        w = edge;
      }
      for (int s = 0; s < kSteps; ++s) {
        Tiles::template load<4>(xp + ((p.col[k] * B / 2 + 16 * s) * mp + m0) * 2, mp * 4);
        amx::each<kC>([&](auto j) {
          Tiles::template load<5 + j % 3>(w + 16 * j * B + kDepth * s, B * 2);
          Tiles::template dot_bf16<j, 5 + j % 3, 4>();
        });
      }
    }
    const int64_t lanes = std::min<int64_t>(16, p.rows - m0);
    amx::each<kC>([&](auto j) {
      store_c<Tiles, j>(y + m0 * p.out_features + r * B + 16 * j, p.out_features, lanes, rows - 16 * j);
    });
  }
}

struct ForwardAmx {  // block rows [r0, r1)
  template <class Tiles>
  static AMNETS_INLINE void run(const Problem* p, const c10::BFloat16* values, const uint16_t* xp, int64_t mp,
                                float* y, int64_t r0, int64_t r1) {
    const int depth = p->block > 32 ? 32 : int(p->block);
    amx::Config config;
    for (int j = 0; j < p->block / 16; ++j) config.set(j, 16, 64);
    config.set(4, depth / 2, 64);
    for (int t = 5; t < 8; ++t) config.set(t, 16, depth * 2);
    Tiles::configure(config);  // per call: the tile configuration is the thread's, and other code may change it
    for (int64_t r = r0; r < r1; ++r) {
      switch (p->block) {
        case 16: forward_amx_block_row<Tiles, 16>(*p, values, xp, mp, y, r); break;
        case 32: forward_amx_block_row<Tiles, 32>(*p, values, xp, mp, y, r); break;
        default: forward_amx_block_row<Tiles, 64>(*p, values, xp, mp, y, r); break;
      }
    }
    Tiles::release();
  }
};

// The backward on AMX, bf16 weights, from kAmxBackwardMinRows rows (grad_out and x are bf16 values: putting
// them in bf16 rounds nothing; sums in fp32 as elsewhere, in another order).
//
// grad_values: C (16 block rows i x 16 block columns j) += gy^T's rows (A: 16 i x 32 rows m, from gyt, gy
// transposed, m contiguous) times x's rows as pairs over m (B: 16 m-pairs x 16 j, from xm: pair row q, column
// j holds (x[2q, j], x[2q + 1, j])). Both are zero past M (Mp, a multiple of 32) and past the logical matrix.
// Per block, four C tiles at a time (16 rows i of it by up to 64 columns j). Tiles: C 0..3, A 4, B 5..7.
// Timed on an Intel Xeon (AMX, 1 thread, 4096x2048 b=32 d=0.25 bf16, `python -m benchmarks.amx_rows`, fwd+bwd with
// the forward on tiles): with the backward's pair layouts built by pair_rows, the tiles' backward ties AVX512-BF16
// at 16 rows (rows pad to 32 for the pair layout: half of each product is zeros there; 1424 against 1435 us) and
// wins from 24 (1561 against 1955 us; 1676 against 2420 at 32). Through ATen's permuted copies it had lost up to
// 32 rows (benchmarks/results/intel-xeon-1-thread-amx-rows-backward-from-16.md) and the threshold was 48.
constexpr int64_t kAmxBackwardMinRows = 24;

template <class Tiles, int B>
AMNETS_INLINE void grad_values_amx_block(const Problem& p, const uint16_t* gyt, const uint16_t* xm, int64_t mp,
                                         int64_t kp, c10::BFloat16* gv, int64_t k, int64_t r) {
  constexpr int kC = B / 16;
  for (int a = 0; a < kC; ++a) {  // rows 16a .. 16a + 15 of the block
    amx::each<kC>([](auto j) { Tiles::template zero<j>(); });
    for (int64_t m0 = 0; m0 < mp; m0 += 32) {
      Tiles::template load<4>(gyt + (r * B + 16 * a) * mp + m0, mp * 2);
      amx::each<kC>([&](auto j) {
        Tiles::template load<5 + j % 3>(xm + (m0 / 2 * kp + p.col[k] * B + 16 * j) * 2, kp * 4);
        Tiles::template dot_bf16<j, 4, 5 + j % 3>();
      });
    }
    amx::each<kC>([&](auto j) {
      alignas(64) float c[16][16];
      Tiles::template store<j>(c, 64);
      for (int i = 0; i < 16; ++i) simd::store16(gv + k * B * B + (16 * a + i) * B + 16 * j, simd::load(c[i]));
    });
  }
}

struct GradValuesAmx {  // blocks [k0, k1)
  template <class Tiles>
  static AMNETS_INLINE void run(const Problem* p, const uint16_t* gyt, const uint16_t* xm, int64_t mp, int64_t kp,
                                c10::BFloat16* gv, const int64_t* row_of, int64_t k0, int64_t k1) {
    amx::Config config;
    for (int t = 0; t < 8; ++t) config.set(t, 16, 64);
    Tiles::configure(config);
    for (int64_t k = k0; k < k1; ++k) {
      switch (p->block) {
        case 16: grad_values_amx_block<Tiles, 16>(*p, gyt, xm, mp, kp, gv, k, row_of[k]); break;
        case 32: grad_values_amx_block<Tiles, 32>(*p, gyt, xm, mp, kp, gv, k, row_of[k]); break;
        default: grad_values_amx_block<Tiles, 64>(*p, gyt, xm, mp, kp, gv, k, row_of[k]); break;
      }
    }
    Tiles::release();
  }
};

// grad_x: C (16 rows m x 16 block columns j) += gy's rows (A: 16 m x kDepth block rows i, from gyb, gy in bf16
// with Mp16 rows) times the block as pairs over i (B: kDepth/2 i-pairs x 16 j, from wv: the blocks repacked per
// call, pair row q, column j holding (W[2q, j], W[2q + 1, j]), rows past the logical matrix zeroed: they may
// hold anything and gy's zeros would not cancel an inf there). Per block column, up to four C tiles (its
// columns), every block of the column, every depth step. Tiles: C 0..3, A 4, B 5..7.
template <class Tiles, int B>
AMNETS_INLINE void grad_input_amx_column(const Problem& p, const ColumnIndex& ci, const uint16_t* wv,
                                         const uint16_t* gyb, int64_t np, float* gx, int64_t c) {
  constexpr int kC = B / 16, kSteps = B > 32 ? 2 : 1, kDepth = B > 32 ? 32 : B;
  for (int64_t m0 = 0; m0 < p.rows; m0 += 16) {
    amx::each<kC>([](auto j) { Tiles::template zero<j>(); });
    for (int64_t at = ci.start[c]; at < ci.start[c + 1]; ++at) {
      const uint16_t* w = wv + ci.block[at] * B * B;
      for (int s = 0; s < kSteps; ++s) {
        Tiles::template load<4>(gyb + m0 * np + ci.row[at] * B + kDepth * s, np * 2);
        amx::each<kC>([&](auto j) {
          Tiles::template load<5 + j % 3>(w + (kDepth / 2 * s * B + 16 * j) * 2, B * 4);
          Tiles::template dot_bf16<j, 4, 5 + j % 3>();
        });
      }
    }
    const int64_t rows = std::min<int64_t>(16, p.rows - m0), cols = p.cols_in(c);
    amx::each<kC>([&](auto j) {
      alignas(64) float t[16][16];
      Tiles::template store<j>(t, 64);
      const int64_t n = std::min<int64_t>(16, cols - 16 * j);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t i = 0; i < n; ++i) gx[(m0 + m) * p.in_features + c * B + 16 * j + i] = t[m][i];
    });
  }
}

struct GradInputAmx {  // block columns [c0, c1)
  template <class Tiles>
  static AMNETS_INLINE void run(const Problem* p, const ColumnIndex* ci, const uint16_t* wv, const uint16_t* gyb,
                                int64_t np, float* gx, int64_t c0, int64_t c1) {
    const int depth = p->block > 32 ? 32 : int(p->block);
    amx::Config config;
    for (int j = 0; j < 4; ++j) config.set(j, 16, 64);
    config.set(4, 16, depth * 2);
    for (int t = 5; t < 8; ++t) config.set(t, depth / 2, 64);
    Tiles::configure(config);
    for (int64_t c = c0; c < c1; ++c) {
      switch (p->block) {
        case 16: grad_input_amx_column<Tiles, 16>(*p, *ci, wv, gyb, np, gx, c); break;
        case 32: grad_input_amx_column<Tiles, 32>(*p, *ci, wv, gyb, np, gx, c); break;
        default: grad_input_amx_column<Tiles, 64>(*p, *ci, wv, gyb, np, gx, c); break;
      }
    }
    Tiles::release();
  }
};


// ---------------------------------------------------------------------------------------------------
// The ops

Problem problem_of(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                   int64_t out_features, int64_t in_features) {
  const int64_t b = values.size(1);
  return {x.size(0), out_features, in_features, b, (out_features + b - 1) / b, (in_features + b - 1) / b,
          crow.data_ptr<int32_t>(), col.data_ptr<int32_t>()};
}

bool has_fast_path(const Tensor& values) {
  const int64_t b = values.size(1);
  return (b == 16 || b == 32 || b == 64) &&
         (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16);
}

// nn.LSTM's projection w_hr (P, H) of a block-sparse layer whose h is `rec` wide and c `hidden` wide: its shape,
// on the values' device in their dtype (small_batch_mm has a kernel for fp32 and bf16 on every CPU).
void check_projection(const char* op, const Tensor& w_hr, const Tensor& values, int64_t rec, int64_t hidden) {
  checks::shape(op, "w_hr", w_hr, {rec, hidden}, "(proj_size, H) = ");
  TORCH_CHECK_TYPE(w_hr.scalar_type() == values.scalar_type() && w_hr.device() == values.device(), op,
                   ": w_hr must be on the values' device in their dtype ", values.scalar_type(), "; got ",
                   w_hr.scalar_type(), " on ", w_hr.device());
}

// y (B, P) = h (B, H) W_hr^T for a checked, contiguous projection w_hr (P, H), kMaxDotBatch rows a product.
void project(const Tensor& w_hr, const float* h, int64_t batch, float* y) {
  const int64_t rec = w_hr.size(0), hidden = w_hr.size(1);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxDotBatch) {
    const int64_t n = std::min(kMaxDotBatch, batch - b0);
    if (w_hr.scalar_type() == at::kBFloat16) {
      small_batch_mm(h + b0 * hidden, n, w_hr.data_ptr<c10::BFloat16>(), rec, hidden, y + b0 * rec, false);
    } else {
      small_batch_mm(h + b0 * hidden, n, w_hr.data_ptr<float>(), rec, hidden, y + b0 * rec, false);
    }
  }
}

// A float copy of `t` (M, width) with `padded` columns, zeros past `width`.
Tensor float_padded(const Tensor& t, int64_t padded) {
  if (t.scalar_type() == at::kBFloat16) {  // no ATen op on the way (bf16_convert.h)
    const Tensor c = t.contiguous();
    const int64_t rows = c.size(0), cols = c.size(1);
    Tensor f = at::empty({rows, padded}, c.options().dtype(at::kFloat));
    const c10::BFloat16* src = c.data_ptr<c10::BFloat16>();
    float* dst = f.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      widen_bf16(src + r * cols, dst + r * padded, cols);
      std::fill(dst + r * padded + cols, dst + (r + 1) * padded, 0.0f);
    }
    return f;
  }
  Tensor f = t.to(at::kFloat);
  if (padded == t.size(1)) return f.contiguous();
  return at::constant_pad_nd(f, {0, padded - t.size(1)}, 0.0);
}

// y (float, contiguous) in `type`: bf16 through bf16_convert.h, anything else through ATen.
Tensor float_to(const Tensor& y, at::ScalarType type) {
  if (type != at::kBFloat16) return y.to(type);
  Tensor out = at::empty(y.sizes(), y.options().dtype(type));
  narrow_bf16(y.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), y.numel());
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Other block sizes and dtypes: dense math on the densified blocks (padded to whole blocks), in
// float64 for float64 and float32 otherwise. Two things keep it exact in the sense of the fast kernels and the
// reference face: the entries of values that fall in the padding are zeroed first (they must not affect results,
// formats.py), and where x (forward) or grad_out (grad_x) holds a non-finite entry the product goes block row by
// block row, so that the entry reaches only the outputs whose stored blocks cover it: in the dense product the
// zeros of the blocks not stored would spread it (0 * NaN) into every output.

struct DenseView {
  at::ScalarType acc;
  int64_t b, nb, kb;
  Tensor crow, rows, cols;  // crow as int64; block row and column of every stored block
  Tensor values;            // in acc, padding entries zeroed

  DenseView(const Tensor& values_in, const Tensor& crow_in, const Tensor& col, int64_t out_features,
            int64_t in_features)
      : acc(values_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
        b(values_in.size(1)),
        nb((out_features + b - 1) / b),
        kb((in_features + b - 1) / b),
        crow(crow_in.to(at::kLong).contiguous()),
        rows(at::repeat_interleave(at::arange(nb, crow.options()), crow.diff())),
        cols(col.to(at::kLong)) {
    const Tensor within = at::arange(b, crow.options());
    const Tensor row_ok = (rows.unsqueeze(1) * b + within) < out_features;  // (nnzb, b)
    const Tensor col_ok = (cols.unsqueeze(1) * b + within) < in_features;
    values = at::where(row_ok.unsqueeze(2) & col_ok.unsqueeze(1), values_in.to(acc), 0.0);
  }

  Tensor padded_weight() const {  // (nb*b, kb*b)
    Tensor grid = at::zeros({nb, kb, b, b}, values.options());
    grid.index_put_({rows, cols}, values);
    return grid.permute({0, 2, 1, 3}).reshape({nb * b, kb * b});
  }
  Tensor pad(const Tensor& t, int64_t width) const {
    return at::constant_pad_nd(t.to(acc), {0, width - t.size(1)}, 0.0);
  }
  // Block row r's stored blocks side by side, (b, n b), and their block columns (n,).
  std::pair<Tensor, Tensor> row(int64_t r) const {
    const int64_t begin = crow.data_ptr<int64_t>()[r], end = crow.data_ptr<int64_t>()[r + 1];
    const Tensor blocks = values.slice(0, begin, end);  // (n, b, b)
    return {blocks.permute({1, 0, 2}).reshape({b, (end - begin) * b}), cols.slice(0, begin, end)};
  }
};

bool all_finite(const Tensor& t) { return at::isfinite(t).all().item<bool>(); }

Tensor dense_forward(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                     int64_t out_features, int64_t in_features, const c10::optional<Tensor>& bias) {
  const DenseView d(values, crow, col, out_features, in_features);
  const Tensor xp = d.pad(x, d.kb * d.b);
  Tensor y;
  if (all_finite(xp)) {
    y = at::mm(xp, d.padded_weight().t());
  } else {
    y = at::zeros({x.size(0), d.nb * d.b}, xp.options());
    const Tensor xv = xp.view({x.size(0), d.kb, d.b});
    for (int64_t r = 0; r < d.nb; ++r) {
      const auto [w, cols] = d.row(r);
      if (cols.numel()) y.slice(1, r * d.b, (r + 1) * d.b).copy_(at::mm(xv.index_select(1, cols).flatten(1), w.t()));
    }
  }
  y = y.slice(1, 0, out_features);
  if (bias.has_value()) y = y + bias->to(d.acc);
  return y.to(x.scalar_type());
}

std::tuple<Tensor, Tensor> dense_backward(const Tensor& gy, const Tensor& x, const Tensor& values,
                                          const Tensor& crow, const Tensor& col, int64_t out_features,
                                          int64_t in_features, bool need_x, bool need_values) {
  const DenseView d(values, crow, col, out_features, in_features);
  const Tensor g = d.pad(gy, d.nb * d.b);
  Tensor grad_x = x.new_empty({0}), grad_values = values.new_empty({0});
  if (need_x && all_finite(g)) {
    grad_x = at::mm(g, d.padded_weight());
  } else if (need_x) {
    grad_x = at::zeros({x.size(0), d.kb * d.b}, g.options());
    const Tensor gv = grad_x.view({x.size(0), d.kb, d.b});
    for (int64_t r = 0; r < d.nb; ++r) {
      const auto [w, cols] = d.row(r);
      if (cols.numel())
        gv.index_add_(1, cols, at::mm(g.slice(1, r * d.b, (r + 1) * d.b), w).view({x.size(0), -1, d.b}));
    }
  }
  if (need_x) grad_x = grad_x.slice(1, 0, in_features).to(x.scalar_type());
  if (need_values) {  // entry (i, j) of the full product reads only column i of g and column j of x: exact as is
    Tensor full = at::mm(g.t(), d.pad(x, d.kb * d.b)).view({d.nb, d.b, d.kb, d.b}).permute({0, 2, 1, 3});
    grad_values = full.index({d.rows, d.cols}).to(values.scalar_type());
  }
  return {grad_x, grad_values};
}

// ---------------------------------------------------------------------------------------------------
// The ops

// x's first `rows` rows (row stride ld, k columns) transposed, zeros for rows [rows, mp) (mp a multiple of 16),
// in 16 x 16 tiles through registers; 32-bit words moved as they are (a float's bits or a pair of bf16).
// x[m][j] goes to xt[(m / 16) * tile + j * ld_t + m % 16]: (k, mp) row-major is tile = 16, ld_t = mp; the
// fp32 kernel's tile-major layout (tile = 16 k, ld_t = 16) keeps each 16-row tile one contiguous stream.
// ATen's pad and transposing copy cost ~24 us a call at 16 x 2048 on an Intel Xeon, half of a call at d = 0.005.
AMNETS_CLONES void transpose_padded(const float* x, int64_t ld, int64_t rows, int64_t k, int64_t mp, int64_t tile,
                                    int64_t ld_t, float* xt) {
  for (int64_t m0 = 0; m0 < mp; m0 += kWidth) {
    for (int64_t k0 = 0; k0 < k; k0 += kWidth) {
      const int64_t cols = std::min(kWidth, k - k0);
      vfloat t[kWidth];
      for (int64_t i = 0; i < kWidth; ++i) {
        if (m0 + i < rows && cols == kWidth) {
          t[i] = simd::load(x + (m0 + i) * ld + k0);
        } else {  // a padding row, or the last columns (no read past them)
          alignas(64) float part[kWidth] = {};
          if (m0 + i < rows) std::memcpy(part, x + (m0 + i) * ld + k0, cols * sizeof(float));
          t[i] = simd::load(part);
        }
      }
      simd::store_transposed(t, xt + m0 / kWidth * tile + k0 * ld_t, ld_t, cols, kWidth);
    }
  }
}

// The tiles' right operand from x's first `rows` rows (float, row stride ld, k_pad columns): xp[q][m] holds
// (x[m][2q], x[m][2q + 1]) in bf16, zeros for rows m in [rows, mp). The rows are narrowed, then their pairs
// transposed as 32-bit words: the ATen pad/transpose/permute/convert chain this replaces cost ~50 us a call at
// 16 x 2048 on an Intel Xeon, more than the kernel itself at d = 0.1; a scatter of one word at a time ~17 us.
void pack_pairs(const float* x, int64_t ld, int64_t rows, int64_t k_pad, int64_t mp, c10::BFloat16* xp) {
  thread_local std::vector<c10::BFloat16> narrowed;
  narrowed.resize(rows * k_pad);
  for (int64_t m = 0; m < rows; ++m) narrow_bf16(x + m * ld, narrowed.data() + m * k_pad, k_pad);
  static_assert(sizeof(float) == 2 * sizeof(c10::BFloat16));
  transpose_padded(reinterpret_cast<const float*>(narrowed.data()), k_pad / 2, rows, k_pad / 2, mp, kWidth, mp,
                   reinterpret_cast<float*>(xp));
}

// y (M, out_features) float = x W^T through the fast kernels; xf is x as float, padded to k_pad columns.
// x_bf16: xf holds bf16 values (x had the weights' dtype), which the few-row vdpbf16ps kernel may take as bf16; the
// recurrent product of bsr_lstm_sequence_forward passes false (its h is fp32 state).
void forward_into(const Problem& p, const Tensor& values, const Tensor& xf, int64_t k_pad, float* y, bool x_bf16) {
  if (p.rows == 0) return;
  const amx::Kernel tiles_on = values.scalar_type() == at::kBFloat16 ? amx::active() : amx::Kernel::kNone;
  const bool bf16_tiles = values.scalar_type() == at::kBFloat16 && (tiles_on != amx::Kernel::kNone || simd::has_dpbf16());
  // AVX512-BF16 tiles are about twice as cheap per row as the fp32 ones, so only up to kDpbf16FewMax rows past
  // the last full tile go to the few-row kernel (bf16, 4096x2048 b=32 d=0.1 on one AMD EPYC core: a tile
  // 0.233 ms for 1-16 rows, 4 rows few-row 0.111 ms, 17 rows 0.403 ms as two tiles).
  const int64_t rest = p.rows % kWidth <= kDpbf16FewMax ? p.rows % kWidth : 0;
  if (bf16_tiles && p.rows - rest >= kDpbf16MinRows) {
    Problem tiles = p, few = p;
    tiles.rows = p.rows - rest, few.rows = rest;
    const int64_t mp = (tiles.rows + kWidth - 1) / kWidth * kWidth;
    TORCH_INTERNAL_ASSERT(xf.size(1) == k_pad && xf.stride(1) == 1 && k_pad % 2 == 0);
    const Tensor xp = at::empty({k_pad / 2, mp, 2}, xf.options().dtype(at::kBFloat16));
    pack_pairs(xf.data_ptr<float>(), xf.stride(0), tiles.rows, k_pad, mp, xp.data_ptr<c10::BFloat16>());
    const auto* xp_data = reinterpret_cast<const uint16_t*>(xp.data_ptr<c10::BFloat16>());
    parallel_for(0, p.block_rows, 1, [&](int64_t r0, int64_t r1) {
      const c10::BFloat16* v = values.data_ptr<c10::BFloat16>();
      if (tiles_on != amx::Kernel::kNone) {
        amx::run<ForwardAmx>(tiles_on, &tiles, v, xp_data, mp, y, r0, r1);
      } else {
        forward_rows_dpbf16(tiles, v, xp_data, mp, y, r0, r1);
      }
    });
    return forward_into(few, values, xf.narrow(0, tiles.rows, rest), k_pad, y + tiles.rows * p.out_features, x_bf16);
  }
  const bool bf16_dots = x_bf16 && values.scalar_type() == at::kBFloat16 && simd::has_dpbf16() && p.block >= 32;
  if (bf16_dots && p.rows < kDpbf16MinRows) {
    // x narrowed once per call (bf16 values: nothing is rounded) into this thread's scratch, not an ATen tensor: the
    // streamed small layers take this path every frame (a bf16 32x32 call cost 7.3-7.6 us with xf.to(), 6.0-6.1 without).
    TORCH_INTERNAL_ASSERT(xf.size(1) == k_pad && xf.stride(1) == 1 && k_pad % p.block == 0);
    thread_local std::vector<c10::BFloat16> xb;
    xb.resize(p.rows * k_pad);
    const float* xs = xf.data_ptr<float>();
    for (int64_t m = 0; m < p.rows; ++m) narrow_bf16(xs + m * xf.stride(0), xb.data() + m * k_pad, k_pad);
    const auto* xb_data = reinterpret_cast<const uint16_t*>(xb.data());
    parallel_for(0, p.block_rows, 1, [&](int64_t r0, int64_t r1) {
      forward_dots_dpbf16(p, values.data_ptr<c10::BFloat16>(), xb_data, k_pad, y, r0, r1);
    });
    return;
  }
  Tensor xt;  // many rows: x transposed, tile-major (Mp / 16, k_pad, 16), zeros past M
  if (p.rows > kDotRowsMax) {
    const int64_t mp = (p.rows + kWidth - 1) / kWidth * kWidth;
    TORCH_INTERNAL_ASSERT(xf.size(1) == k_pad && xf.stride(1) == 1 && k_pad % kWidth == 0);
    xt = at::empty({mp / kWidth, k_pad, kWidth}, xf.options());
    transpose_padded(xf.data_ptr<float>(), xf.stride(0), p.rows, k_pad, mp, k_pad * kWidth, kWidth,
                     xt.data_ptr<float>());
  }
  const float* xt_data = xt.defined() ? xt.data_ptr<float>() : nullptr;
  parallel_for(0, p.block_rows, 1, [&](int64_t r0, int64_t r1) {
    if (values.scalar_type() == at::kFloat) {
      forward_rows(p, values.data_ptr<float>(), xf.data_ptr<float>(), k_pad, xt_data, k_pad * kWidth, y, r0, r1);
    } else {
      forward_rows(p, values.data_ptr<c10::BFloat16>(), xf.data_ptr<float>(), k_pad, xt_data, k_pad * kWidth, y,
                   r0, r1);
    }
  });
}

// Every entry point checks its own arguments (csrc/checks.h): the kernels below index memory by them.
void check_activations(const char* op, const Tensor& x, const Tensor& values, int64_t in_features,
                       const c10::optional<Tensor>& bias, int64_t out_features) {
  checks::dims(op, "x", x, 2);
  TORCH_CHECK_VALUE(x.size(1) == in_features, op, ": x.shape[-1] must equal in_features = ", in_features, "; got x of shape ",
                    x.sizes());
  // The public op's dtype rule (checks::bsr_linear_args): a floating x; values and bias in its dtype (a bias of
  // another dtype was cast silently, int64 x and values ran as int64).
  checks::floating(op, "x", x);
  checks::like(op, "x", x, "values", values, true);
  if (bias.has_value()) {
    checks::shape(op, "bias", *bias, {out_features});
    checks::like(op, "x", x, "bias", *bias, true);
  }
}

Tensor bsr_linear_forward(const Tensor& x, const Tensor& values_in, const Tensor& crow_indices,
                          const Tensor& col_indices, int64_t out_features, int64_t in_features,
                          const c10::optional<Tensor>& bias) {
  constexpr const char* op = "bsr_linear_forward";
  const auto [crow, col] = checks::bsr_pattern(op, values_in, crow_indices, col_indices, out_features, in_features);
  check_activations(op, x, values_in, in_features, bias, out_features);
  const Tensor values = values_in.contiguous();
  if (!has_fast_path(values)) {
    return dense_forward(x, values, crow, col, out_features, in_features, bias);
  }
  const Problem p = problem_of(x, values, crow, col, out_features, in_features);
  const int64_t k_pad = p.block_cols * p.block;
  Tensor y = at::empty({p.rows, out_features}, x.options().dtype(at::kFloat));
  if (p.rows > 0) forward_into(p, values, float_padded(x, k_pad), k_pad, y.data_ptr<float>(), true);
  if (bias.has_value()) y += bias->to(at::kFloat);
  return float_to(y, x.scalar_type());
}

// One LSTM step whose [W_ih | W_hh] (4H, D + H) is block-sparse, for inference (amnets_kernels
// PreparedBsrLstmCell): gates = [x | h] W^T + bias by the forward kernels above, then the activations
// and the state update (lstm_pointwise.h), in one call: a streaming step at small H costs its host
// overhead, and this is one op instead of a dozen. Fast-path weights only (the caller checks).
std::tuple<Tensor, Tensor> bsr_lstm_cell_forward(const Tensor& x_in, const Tensor& h_in, const Tensor& c_in,
                                                 const Tensor& values_in, const Tensor& crow_indices,
                                                 const Tensor& col_indices, const c10::optional<Tensor>& bias) {
  constexpr const char* op = "bsr_lstm_cell_forward";
  checks::dims(op, "x", x_in, 2);
  checks::dims(op, "h", h_in, 2);
  const int64_t batch = x_in.size(0), d = x_in.size(1), hidden = h_in.size(1);
  TORCH_CHECK_VALUE(hidden >= 1 && d >= 1, op, ": x and h must have at least one column; got ", x_in.sizes(), " and ",
                    h_in.sizes());
  const auto [crow, col] = checks::bsr_pattern(op, values_in, crow_indices, col_indices, 4 * hidden, d + hidden);
  check_activations(op, x_in, values_in, d, bias, 4 * hidden);
  checks::shape(op, "h", h_in, {batch, hidden});
  checks::shape(op, "c", c_in, {batch, hidden});
  checks::like(op, "x", x_in, "h", h_in, true);
  checks::like(op, "x", x_in, "c", c_in, true);
  TORCH_CHECK_TYPE(has_fast_path(values_in), op, ": no fast kernel for block size ", values_in.size(1), " and dtype ",
                   values_in.scalar_type());
  const Tensor x = x_in.contiguous(), h = h_in.contiguous(), c = c_in.contiguous();
  const BsrLstmLayer layer{values_in.contiguous(), crow, col, bias.has_value() ? bias->contiguous() : Tensor(),
                           Tensor(), d, hidden, hidden};
  // The arithmetic is the stack call's (bsr_step_into below); only the checks above are this op's own.
  Tensor h1 = at::empty({batch, hidden}, x.options()), c1 = at::empty({batch, hidden}, x.options());
  std::vector<float> work(bsr_step_work_floats(layer, batch));
  bsr_step_into(layer, batch, x.data_ptr(), h.data_ptr(), c.data_ptr(), h1.data_ptr(), c1.data_ptr(), work.data());
  return {h1, c1};
}

// A whole LSTM sequence, inference only (amnets_kernels.nn.BlockSparseLSTM): W_ih (4H, D) and W_hh (4H, R)
// block-sparse. The input part of every step is one product over all T*B rows first (the many-row shape
// the kernels are efficient at, as nn.LSTM hoists its input GEMM); then each step is the recurrent
// product on h, the precomputed input part and bias added, the state update and, with nn.LSTM's projection
// w_hr (P, H), h = h W_hr^T, with no ATen op per step.
// x (T, B, D), h (B, R) and c (B, H) -> (out (T, B, R), h_T, c_T); R is H, or P with w_hr. Fast-path weights
// only (the caller checks).
std::tuple<Tensor, Tensor, Tensor> bsr_lstm_sequence_forward(
    const Tensor& x_in, const Tensor& h_in, const Tensor& c_in, const Tensor& ih_values_in, const Tensor& ih_crow,
    const Tensor& ih_col, const Tensor& hh_values_in, const Tensor& hh_crow, const Tensor& hh_col,
    const c10::optional<Tensor>& bias, const c10::optional<Tensor>& w_hr) {
  constexpr const char* op = "bsr_lstm_sequence_forward";
  checks::dims(op, "x", x_in, 3);
  checks::dims(op, "h", h_in, 2);
  const int64_t steps = x_in.size(0), batch = x_in.size(1), d = x_in.size(2), rec = h_in.size(1);
  if (w_hr.has_value()) checks::dims(op, "c", c_in, 2);
  const int64_t hidden = w_hr.has_value() ? c_in.size(1) : rec;  // (with a projection h is P wide, c H wide)
  TORCH_CHECK_VALUE(steps >= 1 && hidden >= 1 && rec >= 1 && d >= 1, op,
                    ": x (T, B, D), h (B, R) and c (B, H) need T, D, R, H >= 1; got ", x_in.sizes(), ", ",
                    h_in.sizes(), " and ", c_in.sizes());
  if (w_hr.has_value()) check_projection(op, *w_hr, hh_values_in, rec, hidden);  // (before the patterns: named)
  const auto [ih_crow32, ih_col32] = checks::bsr_pattern(op, ih_values_in, ih_crow, ih_col, 4 * hidden, d);
  const auto [hh_crow32, hh_col32] = checks::bsr_pattern(op, hh_values_in, hh_crow, hh_col, 4 * hidden, rec);
  const Tensor x = x_in.contiguous().view({steps * batch, d});
  check_activations(op, x, ih_values_in, d, bias, 4 * hidden);
  // h's batch too, not only its width: the recurrence reads and writes batch rows of it (a smaller h was read
  // past its end, a larger one overflowed the (B, 4H) gates).
  checks::shape(op, "h", h_in, {batch, rec});
  checks::shape(op, "c", c_in, {batch, hidden});
  checks::like(op, "x", x, "hh_values", hh_values_in, true);
  checks::like(op, "x", x, "h", h_in, true);
  checks::like(op, "x", x, "c", c_in, true);
  TORCH_CHECK_TYPE(has_fast_path(ih_values_in) && has_fast_path(hh_values_in), op,
                   ": no fast kernel for these block sizes / dtypes");
  const Tensor projection = w_hr.has_value() ? w_hr->contiguous() : Tensor();
  const Tensor ih_values = ih_values_in.contiguous(), hh_values = hh_values_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);

  const Problem in = problem_of(x, ih_values, ih_crow32, ih_col32, 4 * hidden, d);
  const int64_t in_pad = in.block_cols * in.block;
  Tensor pre = at::empty({steps * batch, 4 * hidden}, f32);
  forward_into(in, ih_values, float_padded(x, in_pad), in_pad, pre.data_ptr<float>(), true);

  const Problem recurrent = problem_of(h_in, hh_values, hh_crow32, hh_col32, 4 * hidden, rec);
  const int64_t rec_pad = recurrent.block_cols * recurrent.block;
  Tensor hp = float_padded(h_in.contiguous(), rec_pad);  // h as float, zeros past R: the product's input
  // Written every step below: never the caller's h_0 (float_padded hands back an fp32 input with no padding).
  if (hp.data_ptr() == h_in.data_ptr()) hp = hp.clone();
  Tensor c = c_in.to(at::kFloat).contiguous().clone();
  Tensor gates = at::empty({batch, 4 * hidden}, f32), out = at::empty({steps, batch, rec}, f32);
  // With a projection the update writes the H-wide h here and the projection writes out[t].
  Tensor unprojected = projection.defined() ? at::empty({batch, hidden}, f32) : Tensor();
  const Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  float *g = gates.data_ptr<float>(), *hpad = hp.data_ptr<float>(), *o = out.data_ptr<float>();
  const float* p = pre.data_ptr<float>();
  for (int64_t t = 0; t < steps; ++t) {
    forward_into(recurrent, hh_values, hp, rec_pad, g, false);
    const float* pt = p + t * batch * 4 * hidden;
    for (int64_t j = 0; j < batch * 4 * hidden; ++j) g[j] += pt[j];
    float* ht = o + t * batch * rec;
    float* updated = projection.defined() ? unprojected.data_ptr<float>() : ht;
    finish_step(g, b.defined() ? b.data_ptr<float>() : nullptr, c.data_ptr<float>(), updated, batch, hidden);
    if (projection.defined()) project(projection, updated, batch, ht);
    for (int64_t r = 0; r < batch; ++r) std::memcpy(hpad + r * rec_pad, ht + r * rec, rec * sizeof(float));
  }
  const auto type = x.scalar_type();
  return {out.to(type), out[steps - 1].to(type).clone(), c.to(type)};
}

// The block row of every stored block (grad_values runs over blocks, not rows).
std::vector<int64_t> block_row_of(const Problem& p) {
  std::vector<int64_t> row_of(p.crow[p.block_rows]);
  for (int64_t r = 0; r < p.block_rows; ++r)
    for (int64_t k = p.crow[r]; k < p.crow[r + 1]; ++k) row_of[k] = r;
  return row_of;
}

// The tiles' pair layout of a bf16 matrix a (rows x cols, row stride ld), zero-padded to rows_to (even) x cols_to:
// out (rows_to / 2, cols_to) words, word (q, j) holding (a[2q][j], a[2q + 1][j]). ATen's permuted copies of the
// values and of x into this layout took over half of a 64-row backward (4096x2048 b=32 d=0.25, Intel Xeon).
AMNETS_CLONES void pair_rows(const c10::BFloat16* a, int64_t ld, int64_t rows, int64_t cols, int64_t rows_to,
                             int64_t cols_to, c10::BFloat16* out) {
  const auto* src = reinterpret_cast<const uint16_t*>(a);
  auto* words = reinterpret_cast<uint32_t*>(out);
  for (int64_t q = 0; q < rows_to / 2; ++q) {
    uint32_t* dst = words + q * cols_to;
    int64_t live = 0;
    if (2 * q + 1 < rows) {
      const uint16_t *even = src + 2 * q * ld, *odd = even + ld;
      for (live = 0; live < cols; ++live) dst[live] = uint32_t(even[live]) | uint32_t(odd[live]) << 16;
    } else if (2 * q < rows) {  // the last row of an odd count: its pair is padding
      const uint16_t* even = src + 2 * q * ld;
      for (live = 0; live < cols; ++live) dst[live] = even[live];
    }
    std::fill(dst + live, dst + cols_to, 0u);
  }
}

// bsr_linear_backward on AMX tiles (GradInputAmx, GradValuesAmx above): bf16 values, grad_out and x.
std::tuple<Tensor, Tensor> amx_backward(amx::Kernel tiles, const Problem& p, const Tensor& grad_out, const Tensor& x,
                                        const Tensor& values, bool need_x, bool need_values) {
  const int64_t b = p.block, np = p.block_rows * b, kp = p.block_cols * b;
  // bf16 (rows, cols) zero-padded to (rows_to, cols_to): the tiles read whole 16-row, 32-column slices.
  auto padded = [](const Tensor& t, int64_t rows_to, int64_t cols_to) {
    return at::constant_pad_nd(t, {0, cols_to - t.size(1), 0, rows_to - t.size(0)}, 0.0).contiguous();
  };
  auto as_u16 = [](const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>()); };
  Tensor grad_x = x.new_empty({0}), grad_values = values.new_empty({0});
  if (need_x) {
    Tensor v = values;
    if (const int64_t last = p.out_features - (p.block_rows - 1) * b; p.block_rows > 0 && last < b) {
      // rows past out_features may hold anything
      v = values.clone();
      const int64_t k0 = p.crow[p.block_rows - 1], k1 = p.crow[p.block_rows];
      v.narrow(0, k0, k1 - k0).narrow(1, last, b - last).zero_();
    }
    Tensor wv = at::empty_like(v);  // pairs over block rows (b is even: a pair never spans two blocks)
    pair_rows(v.data_ptr<c10::BFloat16>(), b, v.size(0) * b, b, v.size(0) * b, b, wv.data_ptr<c10::BFloat16>());
    const Tensor gyb = padded(grad_out, (p.rows + 15) / 16 * 16, np);
    Tensor gx = at::empty({p.rows, p.in_features}, x.options().dtype(at::kFloat));
    const ColumnIndex ci = column_index(p);
    parallel_for(0, p.block_cols, 1, [&](int64_t c0, int64_t c1) {
      amx::run<GradInputAmx>(tiles, &p, &ci, as_u16(wv), as_u16(gyb), np, gx.data_ptr<float>(), c0, c1);
    });
    grad_x = float_to(gx, x.scalar_type());
  }
  if (need_values) {
    grad_values = at::empty_like(values);
    const int64_t nnzb = values.size(0), mp = (p.rows + 31) / 32 * 32;
    if (nnzb > 0) {
      const Tensor gyt = padded(grad_out, mp, np).t().contiguous();  // (np, mp): m contiguous
      const Tensor xc = x.contiguous();
      Tensor xm = at::empty({mp / 2, kp, 2}, xc.options());  // pairs over m
      pair_rows(xc.data_ptr<c10::BFloat16>(), xc.size(1), p.rows, xc.size(1), mp, kp, xm.data_ptr<c10::BFloat16>());
      const std::vector<int64_t> row_of = block_row_of(p);
      parallel_for(0, nnzb, 1, [&](int64_t k0, int64_t k1) {
        amx::run<GradValuesAmx>(tiles, &p, as_u16(gyt), as_u16(xm), mp, kp,
                                grad_values.data_ptr<c10::BFloat16>(), row_of.data(), k0, k1);
      });
    }
  }
  return {grad_x, grad_values};
}

std::tuple<Tensor, Tensor> bsr_linear_backward(const Tensor& grad_out, const Tensor& x, const Tensor& values_in,
                                               const Tensor& crow_indices, const Tensor& col_indices,
                                               int64_t out_features, int64_t in_features, bool need_x,
                                               bool need_values) {
  constexpr const char* op = "bsr_linear_backward";
  const auto [crow, col] = checks::bsr_pattern(op, values_in, crow_indices, col_indices, out_features, in_features);
  check_activations(op, x, values_in, in_features, c10::nullopt, out_features);
  checks::shape(op, "grad_out", grad_out, {x.size(0), out_features});
  checks::floating(op, "grad_out", grad_out);
  checks::like(op, "x", x, "grad_out", grad_out, false);
  const Tensor values = values_in.contiguous();
  if (!has_fast_path(values)) {
    return dense_backward(grad_out, x, values, crow, col, out_features, in_features, need_x, need_values);
  }
  const Problem p = problem_of(x, values, crow, col, out_features, in_features);
  const amx::Kernel tiles = values.scalar_type() == at::kBFloat16 && grad_out.scalar_type() == at::kBFloat16 &&
                                    p.rows >= kAmxBackwardMinRows
                                ? amx::active()
                                : amx::Kernel::kNone;
  if (tiles != amx::Kernel::kNone) return amx_backward(tiles, p, grad_out, x, values, need_x, need_values);
  const Tensor gy = float_padded(grad_out, out_features);
  Tensor grad_x = x.new_empty({0}), grad_values = values.new_empty({0});
  if (need_x) {
    Tensor gx = at::empty({p.rows, in_features}, x.options().dtype(at::kFloat));
    if (p.rows > 0) {
      const ColumnIndex ci = column_index(p);
      parallel_for(0, p.block_cols, 1, [&](int64_t c0, int64_t c1) {
        if (values.scalar_type() == at::kFloat) {
          grad_input_columns(p, ci, values.data_ptr<float>(), gy.data_ptr<float>(), gx.data_ptr<float>(), c0, c1);
        } else {
          grad_input_columns(p, ci, values.data_ptr<c10::BFloat16>(), gy.data_ptr<float>(), gx.data_ptr<float>(),
                             c0, c1);
        }
      });
    }
    grad_x = float_to(gx, x.scalar_type());
  }
  if (need_values) {
    grad_values = at::empty_like(values);
    const int64_t nnzb = values.size(0);
    if (nnzb > 0) {
      Tensor xf = float_padded(x, p.block_cols * p.block), gf = float_padded(gy, p.block_rows * p.block);
      const int64_t B = p.block, M = p.rows;
      const bool packed = M >= kPackRows;  // see Strided
      if (packed) {
        xf = xf.view({M, p.block_cols, B}).permute({1, 0, 2}).contiguous();
        gf = gf.view({M, p.block_rows, B}).permute({1, 0, 2}).contiguous();
      }
      const Strided xs{xf.data_ptr<float>(), packed ? B : xf.size(1), packed ? M * B : B};
      const Strided gs{gf.data_ptr<float>(), packed ? B : gf.size(1), packed ? M * B : B};
      const std::vector<int64_t> row_of = block_row_of(p);
      parallel_for(0, nnzb, 1, [&](int64_t k0, int64_t k1) {
        if (values.scalar_type() == at::kFloat) {
          grad_values_blocks(p, gs, xs, grad_values.data_ptr<float>(), row_of.data(), k0, k1);
        } else {
          grad_values_blocks(p, gs, xs, grad_values.data_ptr<c10::BFloat16>(), row_of.data(), k0, k1);
        }
      });
    }
  }
  return {grad_x, grad_values};
}

void bsr_check_pattern(const Tensor& crow, const Tensor& col, int64_t nnzb, int64_t block_size, int64_t out_features,
                       int64_t in_features, c10::string_view op) {
  const std::string name(op);
  checks::bsr_pattern(name.c_str(), nnzb, block_size, crow, col, out_features, in_features);
}

}  // namespace

// The fused cell's arithmetic on raw rows (kernels.h): bsr_lstm_cell_forward runs it after its checks, the prepared
// stack call on a layer checked once, when it is made (with its own copy of the int32 pattern).
BsrLstmLayer bsr_lstm_layer(const Tensor& values, const Tensor& crow_indices, const Tensor& col_indices,
                            const c10::optional<Tensor>& bias, int64_t d, int64_t hidden, const Tensor* w_hr,
                            const char* op) {
  if (w_hr != nullptr) checks::dims(op, "w_hr", *w_hr, 2);
  const int64_t rec = w_hr != nullptr ? w_hr->size(0) : hidden;
  TORCH_CHECK_VALUE(hidden >= 1 && d >= 1 && rec >= 1, op, ": needs D, H, proj_size >= 1; got ", d, ", ", hidden,
                    ", ", rec);
  auto [crow, col] = checks::bsr_pattern(op, values, crow_indices, col_indices, 4 * hidden, d + rec);
  TORCH_CHECK_TYPE(has_fast_path(values) && values.is_contiguous(), op, ": no fast kernel for block size ",
                   values.size(1), " and dtype ", values.scalar_type(), " (or the blocks are not contiguous)");
  if (bias.has_value()) {
    checks::shape(op, "bias", *bias, {4 * hidden});
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type() && bias->is_contiguous(), op,
                     ": bias must be contiguous in the values' dtype ", values.scalar_type(), "; got ",
                     bias->scalar_type());
  }
  if (w_hr != nullptr) {
    check_projection(op, *w_hr, values, rec, hidden);
    TORCH_CHECK_TYPE(w_hr->is_contiguous(), op, ": w_hr must be contiguous");
  }
  // Copies of the checked pattern: a write to the module's buffers that moves no version (through .data) must
  // not reach the kernels unchecked (the snapshot that keeps this layer sees only versioned writes).
  return {values, crow.clone(), col.clone(), bias.has_value() ? *bias : Tensor(),
          w_hr != nullptr ? *w_hr : Tensor(), d, hidden, rec};
}

int64_t bsr_step_work_floats(const BsrLstmLayer& layer, int64_t batch) {
  const int64_t b = layer.values.size(1), k_pad = (layer.d + layer.rec + b - 1) / b * b;
  // [x | h | 0], gates, c, the update's h; the bias; a projection's result
  return batch * (k_pad + 6 * layer.hidden + (layer.w_hr.defined() ? layer.rec : 0)) + 4 * layer.hidden;
}

void bsr_step_into(const BsrLstmLayer& layer, int64_t batch, const void* x, const void* h, const void* c, void* h1,
                   void* c1, float* work) {
  const int64_t d = layer.d, hidden = layer.hidden, rec = layer.rec, rows = batch * hidden, b = layer.values.size(1);
  const int64_t k_pad = (d + rec + b - 1) / b * b;
  const bool bf16 = layer.values.scalar_type() == at::kBFloat16, projected = layer.w_hr.defined();
  const auto load = [&](const void* src, int64_t at, int64_t n, float* dst) {  // n elements from row offset `at`
    if (src == nullptr) return std::fill(dst, dst + n, 0.0f);
    if (bf16) return widen_bf16(static_cast<const c10::BFloat16*>(src) + at, dst, n);
    std::memcpy(dst, static_cast<const float*>(src) + at, n * sizeof(float));
  };
  float *z = work, *gates = z + batch * k_pad, *cf = gates + 4 * rows, *hout = cf + rows, *bf = hout + rows;
  float* projection = bf + 4 * hidden;  // (B, P), with a projection in bf16
  if (!bf16) cf = static_cast<float*>(c1), projection = static_cast<float*>(h1);
  if (!bf16 && !projected) hout = static_cast<float*>(h1);
  for (int64_t r = 0; r < batch; ++r) {  // [x | h | zeros] as float, and c1 = c before the update
    load(x, r * d, d, z + r * k_pad);
    load(h, r * rec, rec, z + r * k_pad + d);
    std::fill(z + r * k_pad + d + rec, z + (r + 1) * k_pad, 0.0f);
    load(c, r * hidden, hidden, cf + r * hidden);
  }
  const Tensor xh = at::from_blob(z, {batch, k_pad}, at::TensorOptions().dtype(at::kFloat));
  forward_into(problem_of(xh, layer.values, layer.crow, layer.col, 4 * hidden, d + rec), layer.values, xh, k_pad,
               gates, bf16);  // bf16 weights: x and h were bf16 (widened by `load`)
  const float* bias = nullptr;
  if (layer.bias.defined()) {
    if (bf16) {
      widen_bf16(layer.bias.data_ptr<c10::BFloat16>(), bf, 4 * hidden);
      bias = bf;
    } else {
      bias = layer.bias.data_ptr<float>();
    }
  }
  finish_step(gates, bias, cf, hout, batch, hidden);
  if (projected) {  // h1 = h W_hr^T; bf16: h rounded to bf16 on the way in (small_batch_mm), as nn.LSTM's bf16 h is
    project(layer.w_hr, hout, batch, projection);
    if (bf16) narrow_bf16(projection, static_cast<c10::BFloat16*>(h1), batch * rec);
  } else if (bf16) {
    narrow_bf16(hout, static_cast<c10::BFloat16*>(h1), rows);
  }
  if (bf16) narrow_bf16(cf, static_cast<c10::BFloat16*>(c1), rows);
}

namespace {

// One layer of a projected stack (nn.LSTM's proj_size P): in (B, D), h (B, P), c (B, H), b = (values, crow_indices,
// col_indices of [W_ih | W_hh] (4H, D + P), w_hr (P, H)) -> (h1 (B, P), c1 (B, H)): the fused cell's arithmetic
// with the projection (bsr_step_into), checked here as the cell's op checks its arguments.
std::tuple<Tensor, Tensor> projected_layer(const char* op, const Tensor& in, const Tensor& h, const Tensor& c,
                                           const Tensor* b, const c10::optional<Tensor>& bias, int64_t hidden) {
  checks::dims(op, "x", in, 2);
  const int64_t batch = in.size(0), d = in.size(1);
  const Tensor w_hr = b[3].contiguous();
  const BsrLstmLayer layer = bsr_lstm_layer(b[0].contiguous(), b[1], b[2],
                                            bias.has_value() ? c10::optional<Tensor>(bias->contiguous()) : bias, d,
                                            hidden, &w_hr, op);
  check_activations(op, in, layer.values, d, bias, 4 * hidden);
  checks::shape(op, "h", h, {batch, layer.rec}, "(B, proj_size) = ");
  checks::shape(op, "c", c, {batch, hidden});
  checks::like(op, "x", in, "h", h, true);
  checks::like(op, "x", in, "c", c, true);
  const Tensor x1 = in.contiguous(), h1_in = h.contiguous(), c1_in = c.contiguous();
  Tensor h1 = at::empty({batch, layer.rec}, in.options()), c1 = at::empty({batch, hidden}, in.options());
  std::vector<float> work(bsr_step_work_floats(layer, batch));
  bsr_step_into(layer, batch, x1.data_ptr(), h1_in.data_ptr(), c1_in.data_ptr(), h1.data_ptr(), c1.data_ptr(),
                work.data());
  return {std::move(h1), std::move(c1)};
}

}  // namespace

// A frame through a stack of block-sparse layers (lstm_stack.h), each the fused cell above. Four tensors a layer
// instead of three: nn.LSTM's projection w_hr (P, H) is the fourth, and h0, h_n and out are (.., P)
// (projected_layer).
std::tuple<Tensor, Tensor, Tensor> bsr_lstm_stack_step(const Tensor& x, const c10::optional<Tensor>& h0,
                                                       const c10::optional<Tensor>& c0, at::TensorList blocks,
                                                       const c10::List<c10::optional<Tensor>>& biases, int64_t hidden) {
  const char* op = "bsr_lstm_stack_step";
  // (not a structured binding: the lambda below captures them)
  const std::pair<bool, int64_t> shape = stack_projection(op, blocks, static_cast<int64_t>(biases.size()), 3, hidden);
  const bool projected = shape.first;
  const int64_t rec = shape.second;
  return lstm_stack_step(op, x, h0, c0, blocks, projected ? 4 : 3,
                         "blocks must hold (values, crow_indices, col_indices), and w_hr with a projection,", biases,
                         hidden, rec, [&](const Tensor& in, const Tensor& h, const Tensor& c, const Tensor* b,
                                          const c10::optional<Tensor>& bias) {
                           if (projected) return projected_layer(op, in, h, c, b, bias, hidden);
                           return bsr_lstm_cell_forward(in, h, c, b[0], b[1], b[2], bias);
                         });
}

TORCH_LIBRARY_IMPL(amnets_native, CPU, m) {
  m.impl("bsr_lstm_stack_step", &bsr_lstm_stack_step);
  m.impl("bsr_check_pattern", &bsr_check_pattern);
  m.impl("bsr_linear_forward", &bsr_linear_forward);
  m.impl("bsr_linear_backward", &bsr_linear_backward);
  m.impl("bsr_lstm_cell_forward", &bsr_lstm_cell_forward);
  m.impl("bsr_lstm_sequence_forward", &bsr_lstm_sequence_forward);
}

}  // namespace amnets::cpu
