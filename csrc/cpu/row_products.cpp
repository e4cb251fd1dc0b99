// Small-row products on the CPU (declared in kernels.h), shared by the low-rank LSTM and the frame engine: a
// few rows (a batch of streams, B <= ~64) times a weight matrix, the case where a BLAS call costs more in
// setup than the product (B = 1) or leaves the cores to OpenMP's fork/join (csrc/cpu/parallel.h). Both run
// their threads on our pool.
//   small_batch_mm  y = x A^T for A row-major: row dots, every row of A streamed once for all B inputs;
//   expand          out (+)= s U for U given transposed (R, G), in 64-column panels: axpys, MT rows x 64
//                   outputs in registers while the panel's rows stream past (no horizontal sums).
// Each has a bf16-weight twin on vdpbf16ps (AVX512-BF16) at the end of the file, and expand's twin also runs on
// AMX tiles (amx.h) from kAmxMinRows rows where the CPU has them.

#include <ATen/ATen.h>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "bf16_convert.h"
#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace amnets::cpu {
namespace {

namespace simd = amnets::simd;
using simd::kWidth;
using simd::vfloat;

template <int NB>
AMNETS_INLINE void rows_dot_fixed(const float* a, int64_t cols, const float* x, float* y, int64_t rows,
                                  int64_t r0, int64_t r1, bool accumulate) {
  for (int64_t j = r0; j < r1; ++j) {
    const float* row = a + j * cols;
    simd::vfloat acc[NB] = {}, odd[NB] = {};  // two sums in flight: one chain waits on the FMA latency
    int64_t k = 0;
    for (; k + 2 * simd::kWidth <= cols; k += 2 * simd::kWidth) {
      const simd::vfloat w = simd::load(row + k), w2 = simd::load(row + k + simd::kWidth);
      for (int b = 0; b < NB; ++b) {
        acc[b] += w * simd::load(x + b * cols + k);
        odd[b] += w2 * simd::load(x + b * cols + k + simd::kWidth);
      }
    }
    for (; k + simd::kWidth <= cols; k += simd::kWidth) {
      const simd::vfloat w = simd::load(row + k);
      for (int b = 0; b < NB; ++b) acc[b] += w * simd::load(x + b * cols + k);
    }
    for (int b = 0; b < NB; ++b) {
      float sum = simd::hsum(acc[b] + odd[b]);
      for (int64_t kk = k; kk < cols; ++kk) sum += row[kk] * x[b * cols + kk];
      y[b * rows + j] = accumulate ? y[b * rows + j] + sum : sum;
    }
  }
}

// Rows [r0, r1) as tiles of IT = 16 / NB rows: the IT x NB dot products of a tile accumulate in 16 registers
// and end in one hsum16 (30 shuffles, 15 adds) instead of 16 separate horizontal sums, which dominate when rows
// are short (lowrank_lstm_cell's U products, rows of r = 48 floats: 3 FMAs per output). Leftover rows (fewer
// than a tile) take rows_dot_fixed; the cols % 16 last columns are added per output after the tile's sums.
// Longer rows take rows_dot_fixed, whose horizontal sums are a small share: at r = 256 (lowrank_lstm_cell H=1024,
// B=1) the tiles' one FMA chain per output was 1.01-1.04x of it, fixed 0.95x (alternating processes, AMD EPYC).
constexpr int64_t kTiledMaxCols = 128;
template <int NB>
AMNETS_INLINE void rows_dot_tiled(const float* a, int64_t cols, const float* x, float* y, int64_t rows, int64_t r0,
                                  int64_t r1, bool accumulate) {
  constexpr int IT = kWidth / NB;
  const int64_t whole = cols / kWidth * kWidth;
  int64_t j = r0;
  for (; j + IT <= r1; j += IT) {
    vfloat flat[kWidth] = {};  // flat[i * NB + b]: row j + i times input b
    // Row by row (one pointer; the 16 rows' pointers of a column-by-column walk spilled), one chain of FMAs per
    // output: the tile's other rows are independent work meanwhile (rows are short here, see the caller).
    AMNETS_UNROLL
    for (int i = 0; i < IT; ++i) {
      const float* row = a + (j + i) * cols;
      for (int64_t k = 0; k < whole; k += kWidth) {
        const vfloat w = simd::load(row + k);
        AMNETS_UNROLL
        for (int b = 0; b < NB; ++b) flat[i * NB + b] += w * simd::load(x + b * cols + k);
      }
    }
    const vfloat sums = simd::hsum16(flat);
    AMNETS_UNROLL
    for (int i = 0; i < IT; ++i) {
      AMNETS_UNROLL
      for (int b = 0; b < NB; ++b) {
        float sum = sums[i * NB + b];
        for (int64_t kk = whole; kk < cols; ++kk) sum += a[(j + i) * cols + kk] * x[b * cols + kk];
        y[b * rows + j + i] = accumulate ? y[b * rows + j + i] + sum : sum;
      }
    }
  }
  rows_dot_fixed<NB>(a, cols, x, y, rows, j, r1, accumulate);
}

AMNETS_CLONES void rows_dot(const float* a, int64_t cols, const float* x, int64_t batch, float* y, int64_t rows,
                            int64_t r0, int64_t r1, bool accumulate) {
  if (cols <= kTiledMaxCols && batch != 3) {  // (3 rows do not divide a tile's 16 registers)
    if (batch == 1) return rows_dot_tiled<1>(a, cols, x, y, rows, r0, r1, accumulate);
    if (batch == 2) return rows_dot_tiled<2>(a, cols, x, y, rows, r0, r1, accumulate);
    if (batch >= 4) return rows_dot_tiled<4>(a, cols, x, y, rows, r0, r1, accumulate);
  }
  switch (batch) {
    case 0: return;
    case 1: return rows_dot_fixed<1>(a, cols, x, y, rows, r0, r1, accumulate);
    case 2: return rows_dot_fixed<2>(a, cols, x, y, rows, r0, r1, accumulate);
    case 3: return rows_dot_fixed<3>(a, cols, x, y, rows, r0, r1, accumulate);
    default: return rows_dot_fixed<4>(a, cols, x, y, rows, r0, r1, accumulate);
  }
}

// Columns 0 .. 16C - 1 of out (MT rows) (+)= s U over the R rows of ut: acc[q][m][c] sums the j = q mod S, so
// that ~8 independent FMA chains are in flight (MT C of them alone can be fewer than the FMA latency covers).
template <int MT, int C>
AMNETS_INLINE void expand_cols(const float* ut, int64_t R, int64_t ldu, const float* s, int64_t lds, float* out,
                               int64_t ldo, bool accumulate) {
  constexpr int S = simd::partial_sums(MT * C);
  vfloat acc[S][MT][C] = {};
  int64_t j = 0;
  for (; j + S <= R; j += S) {
    AMNETS_UNROLL
    for (int q = 0; q < S; ++q) {
      vfloat u[C];
      AMNETS_UNROLL
      for (int c = 0; c < C; ++c) u[c] = simd::load(ut + (j + q) * ldu + c * kWidth);
      AMNETS_UNROLL
      for (int m = 0; m < MT; ++m) {
        const float sm = s[m * lds + j + q];
        AMNETS_UNROLL
        for (int c = 0; c < C; ++c) acc[q][m][c] += u[c] * sm;
      }
    }
  }
  for (; j < R; ++j) {
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m) {
      const float sm = s[m * lds + j];
      AMNETS_UNROLL
      for (int c = 0; c < C; ++c) acc[0][m][c] += simd::load(ut + j * ldu + c * kWidth) * sm;
    }
  }
  AMNETS_UNROLL
  for (int m = 0; m < MT; ++m) {
    AMNETS_UNROLL
    for (int c = 0; c < C; ++c) {
      vfloat sum = acc[0][m][c];
      AMNETS_UNROLL
      for (int q = 1; q < S; ++q) sum += acc[q][m][c];
      float* o = out + m * ldo + c * kWidth;
      simd::store(o, accumulate ? simd::load(o) + sum : sum);
    }
  }
}

// out (M, G <= 64) (+)= s (M, R) U for U given transposed, ut (R, G): the panel's 16-column vectors of MT rows
// in registers while the R rows of ut stream past (each output is an axpy over R, not a dot: no horizontal sums).
template <int MT>
AMNETS_INLINE void expand_rows(const float* ut, int64_t R, int64_t G, int64_t ldu, const float* s, int64_t lds,
                               float* out, int64_t ldo, bool accumulate) {
  switch (G / kWidth) {
    case 4: expand_cols<MT, 4>(ut, R, ldu, s, lds, out, ldo, accumulate); break;
    case 3: expand_cols<MT, 3>(ut, R, ldu, s, lds, out, ldo, accumulate); break;
    case 2: expand_cols<MT, 2>(ut, R, ldu, s, lds, out, ldo, accumulate); break;
    case 1: expand_cols<MT, 1>(ut, R, ldu, s, lds, out, ldo, accumulate); break;
    default: break;
  }
  for (int64_t g = G / kWidth * kWidth; g < G; ++g) {  // the last G % 16 outputs
    for (int m = 0; m < MT; ++m) {
      float sum = accumulate ? out[m * ldo + g] : 0.f;
      for (int64_t j = 0; j < R; ++j) sum += ut[j * ldu + g] * s[m * lds + j];
      out[m * ldo + g] = sum;
    }
  }
}

// One panel: out (M, G <= 64; row stride ldo) (+)= s (M, R; row stride lds) U, U^T given as u (R rows, stride ldu).
AMNETS_CLONES void expand_panel(const float* u, int64_t R, int64_t ldu, int64_t G, const float* s, int64_t lds,
                                int64_t M, float* o, int64_t ldo, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) expand_rows<4>(u, R, G, ldu, s + m * lds, lds, o + m * ldo, ldo, accumulate);
  switch (M - m) {
    case 3: return expand_rows<3>(u, R, G, ldu, s + m * lds, lds, o + m * ldo, ldo, accumulate);
    case 2: return expand_rows<2>(u, R, G, ldu, s + m * lds, lds, o + m * ldo, ldo, accumulate);
    case 1: return expand_rows<1>(u, R, G, ldu, s + m * lds, lds, o + m * ldo, ldo, accumulate);
    default: return;
  }
}

}  // namespace

void small_batch_mm(const float* xp, int64_t batch, const float* ap, int64_t rows, int64_t cols, float* yp,
                    bool accumulate) {
  parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    rows_dot(ap, cols, xp, batch, yp, rows, r0, r1, accumulate);
  });
}

Panels pack_transposed(const float* w, int64_t G, int64_t R, float* out) {
  // Panel by panel: its rows of W are read in order (R floats each) and written down the panel's columns,
  // which stay in L2 (64 R floats); gathering W^T element by element instead strode a whole row of W per element.
  const int64_t width = panel_width(G), chunks = (G + width - 1) / width;
  for (int64_t c = 0; c < chunks; ++c) {
    float* panel = out + c * R * width;
    const int64_t used = std::min(width, G - c * width);
    for (int64_t i = 0; i < width; ++i) {
      const float* row = w + (c * width + i) * R;
      for (int64_t j = 0; j < R; ++j) panel[j * width + i] = i < used ? row[j] : 0.f;
    }
  }
  return {out, width, width * R};
}

Panels pack_rows(const float* ut, int64_t R, int64_t G, float* out) {
  const int64_t width = panel_width(G), chunks = (G + width - 1) / width;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t used = std::min(width, G - c * width);
    for (int64_t j = 0; j < R; ++j) {
      float* row = out + c * R * width + j * width;
      std::memcpy(row, ut + j * G + c * width, used * sizeof(float));
      std::fill(row + used, row + width, 0.f);
    }
  }
  return {out, width, width * R};
}

PackedT pack_transposed(const at::Tensor& w) {
  const at::Tensor f = w.to(at::kFloat).contiguous();
  PackedT p;
  p.G = f.size(0), p.R = f.size(1);
  p.data.resize(packed_size(p.R, p.G));
  p.panels = pack_transposed(f.data_ptr<float>(), p.G, p.R, p.data.data());
  return p;
}

void expand(Panels u, int64_t R, int64_t G, const float* s, int64_t lds, int64_t M, float* out, int64_t ldo,
            bool accumulate) {
  const int64_t chunks = (G + kPanel - 1) / kPanel, grain = R * G * M < kParallelMinMacs ? chunks : 1;
  parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      expand_panel(u.data + c * u.chunk_stride, R, u.ldu, std::min(kPanel, G - c * kPanel), s, lds, M,
                   out + c * kPanel, ldo, accumulate);
  });
}

// ---------------------------------------------------------------------------------------------------
// bf16 weights: the same products on vdpbf16ps. The float left operand is rounded to bf16 once per call, into
// the calling thread's buffer (the pool's threads read it there), each row zero-padded to an even width.

namespace {

// `padded` >= rows rows: zeros past `rows` (whole 16-row tiles for AMX).
const uint16_t* rounded_rows(const float* x, int64_t rows, int64_t cols, int64_t ld, int64_t width,
                             int64_t padded) {
  thread_local std::vector<uint16_t> buf;
  buf.resize(padded * width);
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* row = buf.data() + r * width;
    narrow_bf16(x + r * ld, reinterpret_cast<c10::BFloat16*>(row), cols);
    std::fill(row + cols, row + width, uint16_t{0});
  }
  std::fill(buf.data() + rows * width, buf.data() + padded * width, uint16_t{0});
  return buf.data();
}

#ifdef AMNETS_HAVE_DPBF16
// y[b, j] (+)= a[j, :] . x[b, :] for rows j in [r0, r1): 32 products a vdpbf16ps, S partial sums per input
// row so that ~4 chains hide the instruction's latency; x rows are zero-padded to ldx (a multiple of 32), the
// weight row's last partial vector is a masked load (never past the row).
template <int NB>
AMNETS_DPBF16 inline void rows_dot_dp_fixed(const uint16_t* a, int64_t cols, const uint16_t* x, int64_t ldx, float* y,
                                            int64_t rows, int64_t r0, int64_t r1, bool accumulate) {
  constexpr int S = NB >= 4 ? 1 : 4 / NB;
  const int64_t whole = cols / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (cols - whole)) - 1);
  for (int64_t j = r0; j < r1; ++j) {
    const uint16_t* row = a + j * cols;
    __m512 acc[S][NB];
    AMNETS_UNROLL
    for (int q = 0; q < S; ++q)
      AMNETS_UNROLL
      for (int b = 0; b < NB; ++b) acc[q][b] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * S <= whole; k += 32 * S) {
      AMNETS_UNROLL
      for (int q = 0; q < S; ++q) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(row + k + 32 * q);
        AMNETS_UNROLL
        for (int b = 0; b < NB; ++b)
          acc[q][b] = _mm512_dpbf16_ps(acc[q][b], w, (__m512bh)_mm512_loadu_si512(x + b * ldx + k + 32 * q));
      }
    }
    for (; k < whole + (tail != 0) * 32; k += 32) {
      const __m512bh w = (__m512bh)(k < whole ? _mm512_loadu_si512(row + k) : _mm512_maskz_loadu_epi16(tail, row + k));
      AMNETS_UNROLL
      for (int b = 0; b < NB; ++b)
        acc[0][b] = _mm512_dpbf16_ps(acc[0][b], w, (__m512bh)_mm512_loadu_si512(x + b * ldx + k));
    }
    AMNETS_UNROLL
    for (int b = 0; b < NB; ++b) {
      __m512 sum = acc[0][b];
      AMNETS_UNROLL
      for (int q = 1; q < S; ++q) sum = _mm512_add_ps(sum, acc[q][b]);
      const float dot = simd::hsum(sum);
      y[b * rows + j] = accumulate ? y[b * rows + j] + dot : dot;
    }
  }
}

AMNETS_DPBF16 void rows_dot_dp(const uint16_t* a, int64_t cols, const uint16_t* x, int64_t ldx, int64_t batch,
                               float* y, int64_t rows, int64_t r0, int64_t r1, bool accumulate) {
  switch (batch) {
    case 0: return;
    case 1: return rows_dot_dp_fixed<1>(a, cols, x, ldx, y, rows, r0, r1, accumulate);
    case 2: return rows_dot_dp_fixed<2>(a, cols, x, ldx, y, rows, r0, r1, accumulate);
    case 3: return rows_dot_dp_fixed<3>(a, cols, x, ldx, y, rows, r0, r1, accumulate);
    default: return rows_dot_dp_fixed<4>(a, cols, x, ldx, y, rows, r0, r1, accumulate);
  }
}

// One pair row j of U against MT rows of s, into the accumulators of one partial sum.
template <int MT, int C>
AMNETS_DPBF16 inline __attribute__((always_inline)) void pair_row_dp(__m512 (&acc)[MT][C], const uint16_t* u,
                                                                     const uint16_t* sp, int64_t lds, int64_t j) {
  __m512bh uv[C];
  AMNETS_UNROLL
  for (int c = 0; c < C; ++c) uv[c] = (__m512bh)_mm512_loadu_si512(u + 32 * c);
  AMNETS_UNROLL
  for (int m = 0; m < MT; ++m) {
    int32_t pair;
    std::memcpy(&pair, sp + m * lds + 2 * j, sizeof pair);
    const __m512bh sv = (__m512bh)_mm512_set1_epi32(pair);
    AMNETS_UNROLL
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], uv[c], sv);
  }
}

// Columns 0 .. min(16C, cols) - 1 of out (MT rows) (+)= s U over Rp pair rows: as expand_cols, one pair of
// U's rows per vdpbf16ps against the broadcast pair (s[m, 2q], s[m, 2q + 1]) (sp: s rounded, lds per row).
template <int MT, int C>
AMNETS_DPBF16 inline void expand_cols_dp(const uint16_t* u, int64_t Rp, int64_t ldu, const uint16_t* sp, int64_t lds,
                                         float* out, int64_t ldo, int64_t cols, bool accumulate) {
  constexpr int S = simd::partial_sums(MT * C);
  __m512 acc[S][MT][C];
  AMNETS_UNROLL
  for (int q = 0; q < S; ++q)
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m)
      AMNETS_UNROLL
      for (int c = 0; c < C; ++c) acc[q][m][c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + S <= Rp; j += S) {
    AMNETS_UNROLL
    for (int q = 0; q < S; ++q) pair_row_dp<MT, C>(acc[q], u + (j + q) * ldu, sp, lds, j + q);
  }
  for (; j < Rp; ++j) pair_row_dp<MT, C>(acc[0], u + j * ldu, sp, lds, j);
  AMNETS_UNROLL
  for (int m = 0; m < MT; ++m) {
    AMNETS_UNROLL
    for (int c = 0; c < C; ++c) {
      const int64_t n = std::min<int64_t>(16, cols - 16 * c);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      __m512 sum = acc[0][m][c];
      AMNETS_UNROLL
      for (int q = 1; q < S; ++q) sum = _mm512_add_ps(sum, acc[q][m][c]);
      float* o = out + m * ldo + 16 * c;
      if (accumulate) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, o));
      _mm512_mask_storeu_ps(o, mask, sum);
    }
  }
}

template <int MT>
AMNETS_DPBF16 inline void expand_rows_dp(const uint16_t* u, int64_t Rp, int64_t ldu, const uint16_t* sp, int64_t lds,
                                         float* out, int64_t ldo, int64_t cols, bool accumulate) {
  switch ((cols + 15) / 16) {
    case 4: return expand_cols_dp<MT, 4>(u, Rp, ldu, sp, lds, out, ldo, cols, accumulate);
    case 3: return expand_cols_dp<MT, 3>(u, Rp, ldu, sp, lds, out, ldo, cols, accumulate);
    case 2: return expand_cols_dp<MT, 2>(u, Rp, ldu, sp, lds, out, ldo, cols, accumulate);
    default: return expand_cols_dp<MT, 1>(u, Rp, ldu, sp, lds, out, ldo, cols, accumulate);
  }
}

AMNETS_DPBF16 void expand_panel_dp(const uint16_t* u, int64_t Rp, int64_t ldu, int64_t G, const uint16_t* sp,
                                   int64_t lds, int64_t M, float* o, int64_t ldo, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) expand_rows_dp<4>(u, Rp, ldu, sp + m * lds, lds, o + m * ldo, ldo, G, accumulate);
  switch (M - m) {
    case 3: return expand_rows_dp<3>(u, Rp, ldu, sp + m * lds, lds, o + m * ldo, ldo, G, accumulate);
    case 2: return expand_rows_dp<2>(u, Rp, ldu, sp + m * lds, lds, o + m * ldo, ldo, G, accumulate);
    case 1: return expand_rows_dp<1>(u, Rp, ldu, sp + m * lds, lds, o + m * ldo, ldo, G, accumulate);
    default: return;
  }
}
#else
void rows_dot_dp(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t, int64_t, int64_t,
                 bool) {}
void expand_panel_dp(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t,
                     bool) {}
#endif

// expand's panel on AMX (amx.h): out's rows m0 .. m0 + 15 by the panel's (up to 64) columns, as C tiles 0..3 (16
// columns each) += sp's rows (A: 16 rows x 16 pairs, tile 4) times the panel's pair rows as they are (B: 16 pair
// rows x 16 columns' pairs, tile 6: the panels already have TDPBF16PS's layout). A last partial step of `tail`
// pairs runs on tiles 5 and 7, configured to its width. sp's rows are zero-padded to whole 16-row tiles; rows
// past M and columns past G are computed and not stored.
constexpr int64_t kAmxMinRows = 8;  // not tuned: no AMX CPU to time it on yet (the bsr tiles start at 8 rows too)

amx::Config expand_config(int64_t Rp) {
  amx::Config config;
  for (int j = 0; j < 4; ++j) config.set(j, 16, 64);
  config.set(4, 16, 64), config.set(6, 16, 64);
  if (const int tail = int(Rp % 16); tail > 0) config.set(5, 16, 4 * tail), config.set(7, tail, 64);
  return config;
}

template <class Tiles>
AMNETS_INLINE void expand_panel_amx(const uint16_t* u, int64_t Rp, int64_t ldu, int64_t G, const uint16_t* sp,
                                    int64_t lds, int64_t M, float* out, int64_t ldo, bool accumulate) {
  const int64_t whole = Rp / 16 * 16;
  const int n = int((G + 15) / 16);
  auto tiles = [&](auto body) {  // body(tile J) for each C tile J < n
    amx::each<4>([&](auto j) {
      if (j < n) body(j);
    });
  };
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    tiles([&](auto j) { Tiles::template zero<j>(); });
    for (int64_t q = 0; q < whole; q += 16) {
      Tiles::template load<4>(sp + m0 * lds + 2 * q, lds * 2);
      tiles([&](auto j) {
        Tiles::template load<6>(u + q * ldu + 32 * j, ldu * 2);
        Tiles::template dot_bf16<j, 4, 6>();
      });
    }
    if (whole < Rp) {
      Tiles::template load<5>(sp + m0 * lds + 2 * whole, lds * 2);
      tiles([&](auto j) {
        Tiles::template load<7>(u + whole * ldu + 32 * j, ldu * 2);
        Tiles::template dot_bf16<j, 5, 7>();
      });
    }
    const int64_t rows = std::min<int64_t>(16, M - m0);
    tiles([&](auto j) {
      alignas(64) float c[16][16];
      Tiles::template store<j>(c, 64);
      const int64_t cols = std::min<int64_t>(16, G - 16 * j);
      for (int64_t i = 0; i < rows; ++i) {
        float* o = out + (m0 + i) * ldo + 16 * j;
        for (int64_t k = 0; k < cols; ++k) o[k] = accumulate ? o[k] + c[i][k] : c[i][k];
      }
    });
  }
}

struct ExpandAmx {  // panels [c0, c1)
  template <class Tiles>
  static AMNETS_INLINE void run(const PairPanels* u, int64_t Rp, int64_t G, const uint16_t* sp, int64_t lds, int64_t M,
                                float* out, int64_t ldo, bool accumulate, int64_t c0, int64_t c1) {
    Tiles::configure(expand_config(Rp));  // per call: the tile configuration is the thread's
    for (int64_t c = c0; c < c1; ++c)
      expand_panel_amx<Tiles>(u->data + c * u->chunk_stride, Rp, u->ldu, std::min(kPanel, G - c * kPanel), sp, lds,
                              M, out + c * kPanel, ldo, accumulate);
    Tiles::release();
  }
};

}  // namespace

void small_batch_mm(const float* xp, int64_t batch, const c10::BFloat16* ap, int64_t rows, int64_t cols, float* yp,
                    bool accumulate) {
  const int64_t ldx = (cols + 31) / 32 * 32;
  const uint16_t* x = rounded_rows(xp, batch, cols, cols, ldx, batch);
  if (!simd::has_dpbf16()) {
    // A CPU without AVX512-BF16: the same bf16 operands (x rounded as above) widened to fp32 for the float
    // kernel, kBlock weight rows at a time: the products are exact in fp32 either way, only the order of the sums
    // differs from the dot-product kernel's.
    constexpr int64_t kBlock = 64;
    std::vector<float> xf(batch * cols);
    for (int64_t b = 0; b < batch; ++b)
      widen_bf16(reinterpret_cast<const c10::BFloat16*>(x + b * ldx), xf.data() + b * cols, cols);
    parallel_for(0, rows, kBlock, [&](int64_t r0, int64_t r1) {
      std::vector<float> block(kBlock * cols);
      for (int64_t j = r0; j < r1; j += kBlock) {
        const int64_t n = std::min(kBlock, r1 - j);
        widen_bf16(ap + j * cols, block.data(), n * cols);
        rows_dot(block.data(), cols, xf.data(), batch, yp + j, rows, 0, n, accumulate);
      }
    });
    return;
  }
  const auto* a = reinterpret_cast<const uint16_t*>(ap);
  parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    rows_dot_dp(a, cols, x, ldx, batch, yp, rows, r0, r1, accumulate);
  });
}

PairPanels pack_pairs_transposed(const c10::BFloat16* w, int64_t G, int64_t R, uint16_t* out) {
  const int64_t width = panel_width(G), chunks = (G + width - 1) / width, Rp = (R + 1) / 2;
  for (int64_t c = 0; c < chunks; ++c) {
    uint16_t* panel = out + c * Rp * 2 * width;
    const int64_t used = std::min(width, G - c * width);
    for (int64_t i = 0; i < width; ++i) {
      const c10::BFloat16* row = w + (c * width + i) * R;
      for (int64_t j = 0; j < 2 * Rp; ++j)
        panel[j / 2 * 2 * width + 2 * i + j % 2] = i < used && j < R ? row[j].x : uint16_t{0};
    }
  }
  return {out, 2 * width, 2 * width * Rp};
}

PackedPairsT pack_pairs_transposed(const at::Tensor& w) {
  TORCH_INTERNAL_ASSERT(w.scalar_type() == at::kBFloat16 && w.dim() == 2);
  const at::Tensor c = w.contiguous();
  PackedPairsT p;
  p.G = c.size(0), p.R = c.size(1);
  p.data.resize(packed_pairs_size(p.R, p.G));
  p.panels = pack_pairs_transposed(c.data_ptr<c10::BFloat16>(), p.G, p.R, p.data.data());
  return p;
}

void expand(PairPanels u, int64_t R, int64_t G, const float* s, int64_t lds, int64_t M, float* out, int64_t ldo,
            bool accumulate) {
  const int64_t Rp = (R + 1) / 2, chunks = (G + kPanel - 1) / kPanel;
  const int64_t grain = R * G * M < 2 * kParallelMinMacs ? chunks : 1;  // half the instructions of a float MAC
  const amx::Kernel tiles = M >= kAmxMinRows ? amx::active() : amx::Kernel::kNone;
  const uint16_t* sp = rounded_rows(s, M, R, lds, 2 * Rp, tiles == amx::Kernel::kNone ? M : (M + 15) / 16 * 16);
  parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    if (tiles != amx::Kernel::kNone) return amx::run<ExpandAmx>(tiles, &u, Rp, G, sp, 2 * Rp, M, out, ldo, accumulate,
                                                                 c0, c1);
    for (int64_t c = c0; c < c1; ++c)
      expand_panel_dp(u.data + c * u.chunk_stride, Rp, u.ldu, std::min(kPanel, G - c * kPanel), sp, 2 * Rp, M,
                      out + c * kPanel, ldo, accumulate);
  });
}

}  // namespace amnets::cpu
