// The LSTM step's pointwise part on the CPU, shared by the faces that end an LSTM step (the low-rank
// LSTM and the block-sparse LSTM cell): activations of the gate pre-activations [i | f | g | o] (nn.LSTM's
// order) and the state update, vectorised through simd.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace amnets::cpu {
namespace {  // internal linkage: each including file gets its own clones

namespace simd = amnets::simd;

AMNETS_INLINE simd::vfloat sigmoid(simd::vfloat x) { return 1.0f / (1.0f + simd::exp(-x)); }
AMNETS_INLINE simd::vfloat tanh_(simd::vfloat x) { return 2.0f / (1.0f + simd::exp(-2.0f * x)) - 1.0f; }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Activations and state update of `n` hidden units of one batch row: pre (4H) -> gates (4H, activated,
// written over pre), c (H) updated in place, h (H) written.
AMNETS_CLONES void step_forward(float* pre, float* c, float* h, int64_t n, int64_t hidden) {
  float *i = pre, *f = pre + hidden, *g = pre + 2 * hidden, *o = pre + 3 * hidden;
  int64_t k = 0;
  for (; k + simd::kWidth <= n; k += simd::kWidth) {
    const simd::vfloat vi = sigmoid(simd::load(i + k)), vf = sigmoid(simd::load(f + k));
    const simd::vfloat vg = tanh_(simd::load(g + k)), vo = sigmoid(simd::load(o + k));
    const simd::vfloat vc = vf * simd::load(c + k) + vi * vg;
    simd::store(i + k, vi), simd::store(f + k, vf), simd::store(g + k, vg), simd::store(o + k, vo);
    simd::store(c + k, vc);
    simd::store(h + k, vo * tanh_(vc));
  }
  for (; k < n; ++k) {
    i[k] = sigmoid(i[k]), f[k] = sigmoid(f[k]), g[k] = std::tanh(g[k]), o[k] = sigmoid(o[k]);
    c[k] = f[k] * c[k] + i[k] * g[k];
    h[k] = o[k] * std::tanh(c[k]);
  }
}

// One inference step's end for `batch` rows: gates (batch, 4H) += bias (if any), then step_forward per row;
// c (batch, H) holds c_{t-1} and becomes c_t, h (batch, H) is written.
inline void finish_step(float* gates, const float* bias, float* c, float* h, int64_t batch, int64_t hidden) {
  for (int64_t r = 0; r < batch; ++r) {
    float* row = gates + r * 4 * hidden;
    if (bias != nullptr)
      for (int64_t j = 0; j < 4 * hidden; ++j) row[j] += bias[j];
    step_forward(row, c + r * hidden, h + r * hidden, hidden, hidden);
  }
}

void step_forward(double* pre, double* c, double* h, int64_t n, int64_t hidden) {
  double *i = pre, *f = pre + hidden, *g = pre + 2 * hidden, *o = pre + 3 * hidden;
  for (int64_t k = 0; k < n; ++k) {
    i[k] = sigmoid(i[k]), f[k] = sigmoid(f[k]), g[k] = std::tanh(g[k]), o[k] = sigmoid(o[k]);
    c[k] = f[k] * c[k] + i[k] * g[k];
    h[k] = o[k] * std::tanh(c[k]);
  }
}

}  // namespace
}  // namespace amnets::cpu
