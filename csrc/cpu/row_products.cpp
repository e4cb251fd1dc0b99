// Small-row products on the CPU (declared in kernels.h), shared by the low-rank LSTM and the frame engine: a
// few rows (a batch of streams, B <= ~64) times a weight matrix, the case where a BLAS call costs more in
// setup than the product (B = 1) or leaves the cores to OpenMP's fork/join (csrc/cpu/parallel.h). Both run
// their threads on our pool.
//   small_batch_mm  y = x A^T for A row-major: row dots, every row of A streamed once for all B inputs;
//   expand          out (+)= s U for U given transposed (R, G), in 64-column panels: axpys, MT rows x 64
//                   outputs in registers while the panel's rows stream past (no horizontal sums).

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

AMNETS_CLONES void rows_dot(const float* a, int64_t cols, const float* x, int64_t batch, float* y, int64_t rows,
                            int64_t r0, int64_t r1, bool accumulate) {
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

}  // namespace amnets::cpu
