// bf16 <-> float over contiguous runs on the CPU, vectorised through simd.h (bit for bit c10::BFloat16's
// conversions): a per-element c10 conversion, or an ATen copy per tensor, cost the small calls that use these
// (a streamed frame, a few-row bsr_linear) microseconds each.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "simd.h"

namespace amnets::cpu {
namespace {  // internal linkage: each including file gets its own clones

AMNETS_CLONES void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + simd::kWidth <= n; i += simd::kWidth) simd::store(dst + i, simd::load16(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

AMNETS_CLONES void narrow_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + simd::kWidth <= n; i += simd::kWidth) simd::store16(dst + i, simd::load(src + i));
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

// x rounded to bf16 precision in place: a round trip through c10::BFloat16.
AMNETS_CLONES void round_to_bf16(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + simd::kWidth <= n; i += simd::kWidth) simd::store(x + i, simd::round_bf16(simd::load(x + i)));
  for (; i < n; ++i) x[i] = static_cast<float>(c10::BFloat16(x[i]));
}

}  // namespace
}  // namespace amnets::cpu
