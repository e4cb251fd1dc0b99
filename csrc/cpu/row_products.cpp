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

// out (M, G) (+)= s (M, R) U for U given transposed, ut (R, G): 64 outputs of MT rows in registers while
// the R rows of ut stream past (each output is an axpy over R, not a dot: no horizontal sums).
template <int MT>
AMNETS_INLINE void expand_rows(const float* ut, int64_t R, int64_t G, int64_t ldu, const float* s, int64_t lds,
                               float* out, int64_t ldo, bool accumulate) {
  constexpr int C = 4;
  int64_t g0 = 0;
  for (; g0 + C * kWidth <= G; g0 += C * kWidth) {
    vfloat acc[MT][C];
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m)
      AMNETS_UNROLL
      for (int c = 0; c < C; ++c) acc[m][c] = accumulate ? simd::load(out + m * ldo + g0 + c * kWidth) : simd::splat(0.f);
    for (int64_t j = 0; j < R; ++j) {
      vfloat u[C];
      AMNETS_UNROLL
      for (int c = 0; c < C; ++c) u[c] = simd::load(ut + j * ldu + g0 + c * kWidth);
      AMNETS_UNROLL
      for (int m = 0; m < MT; ++m) {
        const float sm = s[m * lds + j];
        AMNETS_UNROLL
        for (int c = 0; c < C; ++c) acc[m][c] += u[c] * sm;
      }
    }
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m)
      AMNETS_UNROLL
      for (int c = 0; c < C; ++c) simd::store(out + m * ldo + g0 + c * kWidth, acc[m][c]);
  }
  for (; g0 + kWidth <= G; g0 += kWidth) {  // then 16 at a time, four sums over j in flight
    vfloat acc[4][MT] = {};
    int64_t j = 0;
    for (; j + 4 <= R; j += 4) {
      AMNETS_UNROLL
      for (int q = 0; q < 4; ++q) {
        const vfloat u = simd::load(ut + (j + q) * ldu + g0);
        AMNETS_UNROLL
        for (int m = 0; m < MT; ++m) acc[q][m] += u * s[m * lds + j + q];
      }
    }
    for (; j < R; ++j) {
      const vfloat u = simd::load(ut + j * ldu + g0);
      AMNETS_UNROLL
      for (int m = 0; m < MT; ++m) acc[0][m] += u * s[m * lds + j];
    }
    AMNETS_UNROLL
    for (int m = 0; m < MT; ++m) {
      const vfloat sum = (acc[0][m] + acc[1][m]) + (acc[2][m] + acc[3][m]);
      simd::store(out + m * ldo + g0, accumulate ? simd::load(out + m * ldo + g0) + sum : sum);
    }
  }
  for (int64_t g = g0; g < G; ++g) {  // the last G % 16 outputs
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
  // Panel by panel: its 64 rows of W are read in order (R floats each) and written down the panel's columns,
  // which stay in L2 (64 R floats); gathering W^T element by element instead strode a whole row of W per element.
  const int64_t chunks = (G + kPanel - 1) / kPanel;
  for (int64_t c = 0; c < chunks; ++c) {
    float* panel = out + c * R * kPanel;
    const int64_t width = std::min(kPanel, G - c * kPanel);
    for (int64_t i = 0; i < kPanel; ++i) {
      const float* row = w + (c * kPanel + i) * R;
      for (int64_t j = 0; j < R; ++j) panel[j * kPanel + i] = i < width ? row[j] : 0.f;
    }
  }
  return {out, kPanel, kPanel * R};
}

PackedT pack_transposed(const at::Tensor& w) {
  const at::Tensor f = w.to(at::kFloat).contiguous();
  PackedT p;
  p.G = f.size(0), p.R = f.size(1);
  p.data.resize(packed_size(p.R, p.G));
  p.panels = pack_transposed(f.data_ptr<float>(), p.G, p.R, p.data.data());
  return p;
}

void expand(Panels u, int64_t R, int64_t G, const float* s, int64_t lds, int64_t M, float* out, bool accumulate) {
  const int64_t chunks = (G + kPanel - 1) / kPanel, grain = R * G * M < (1 << 18) ? chunks : 1;
  parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      expand_panel(u.data + c * u.chunk_stride, R, u.ldu, std::min(kPanel, G - c * kPanel), s, lds, M,
                   out + c * kPanel, G, accumulate);
  });
}

}  // namespace amnets::cpu
