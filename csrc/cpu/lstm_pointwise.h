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
// written over pre), c (H) updated in place, h (H) written. Two passes (the gates, then the state) rather
// than one: the exps are throughput-bound, and one pass ends each vector on a long dependent chain
// (activations -> c -> tanh(c) -> h) that stalls the next (H=192: 0.59 -> 0.52 us a step on one AMD EPYC core).
AMNETS_CLONES void step_forward(float* pre, float* c, float* h, int64_t n, int64_t hidden) {
  float *i = pre, *f = pre + hidden, *g = pre + 2 * hidden, *o = pre + 3 * hidden;
  const int64_t vec = n / simd::kWidth * simd::kWidth;
  for (int64_t k = 0; k < vec; k += simd::kWidth) {
    simd::store(i + k, sigmoid(simd::load(i + k)));
    simd::store(f + k, sigmoid(simd::load(f + k)));
    simd::store(g + k, tanh_(simd::load(g + k)));
    simd::store(o + k, sigmoid(simd::load(o + k)));
  }
  for (int64_t k = 0; k < vec; k += simd::kWidth) {
    const simd::vfloat vc = simd::load(f + k) * simd::load(c + k) + simd::load(i + k) * simd::load(g + k);
    simd::store(c + k, vc);
    simd::store(h + k, simd::load(o + k) * tanh_(vc));
  }
  for (int64_t k = vec; k < n; ++k) {
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
