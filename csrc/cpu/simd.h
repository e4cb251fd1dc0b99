// Portable SIMD for the CPU faces, chosen at run time: no -march flags, one binary for every x86-64.
//
// Kernels are written once with GCC/Clang vector extensions (16 floats = one AVX-512 register, two
// AVX2 registers, four SSE registers) in functions marked AMNETS_CLONES; the compiler emits an
// AVX-512, an AVX2 and a baseline version of each and the loader picks one for the CPU it runs on
// (an ifunc). Helpers here are always_inline so that they take the ISA of the clone calling them.
#pragma once

#include <c10/util/BFloat16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AMNETS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AMNETS_CLONES
#endif
#define AMNETS_INLINE inline __attribute__((always_inline))
// Kernels on AVX512-BF16's vdpbf16ps (32 bf16 products summed pairwise into 16 fp32 lanes: twice an FMA's
// work) are compiled for that ISA alone and called only where has_dpbf16() (simd::has_dpbf16) says so.
#if defined(__x86_64__) && defined(__GNUC__)
#define AMNETS_HAVE_DPBF16 1
#define AMNETS_DPBF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#endif
// Loops with compile-time trip counts over accumulators: unrolled, so the accumulators live in registers.
#define AMNETS_UNROLL _Pragma("GCC unroll 16")

namespace amnets::simd {

constexpr int64_t kWidth = 16;

// Tests only (build_info.cpp's set_cpu_dpbf16("off")): the kernels as a CPU without AVX512-BF16 runs them.
inline std::atomic<bool>& dpbf16_off() {
  static std::atomic<bool> off{false};
  return off;
}

inline bool has_dpbf16() {
#ifdef AMNETS_HAVE_DPBF16
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return yes && !dpbf16_off().load(std::memory_order_relaxed);
#else
  return false;
#endif
}
// Independent partial sums a loop with `accumulators` vector accumulators per step keeps, so that ~8 FMA
// chains are in flight (the FMA latency over its issue interval), at most 4.
constexpr int partial_sums(int accumulators) {
  return accumulators >= 8 ? 1 : (8 / accumulators > 4 ? 4 : 8 / accumulators);
}
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));

// x - 0 is x for every float (-0 included), so this is one broadcast (`vfloat{} + x` is not: 0 + -0 = +0,
// an extra add). In inner loops write `scalar * vector` instead: GCC then folds the broadcast into the
// FMA's memory operand ({1to16}); a splat() there became a 64-byte load and a register broadcast.
AMNETS_INLINE vfloat splat(float x) { return x - vfloat{}; }
AMNETS_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
AMNETS_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
// 16 consecutive weights as floats; bf16 widens by a shift.
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
AMNETS_INLINE vfloat load16(const float* p) { return load(p); }
AMNETS_INLINE vfloat load16(const c10::BFloat16* p) {
  vu16 half;
  std::memcpy(&half, p, sizeof half);
  vu32 wide = __builtin_convertvector(half, vu32) << 16;
  vfloat out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}
// Each lane's nearest bf16 (ties to even; NaN gives 0x7FC0) as the 16-bit pattern in the lane's low half: bit
// for bit what c10::BFloat16(float) gives, without its scalar per-element path.
AMNETS_INLINE vu32 bf16_bits(vfloat v) {
  vu32 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const vu32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  const vu32 nan = (vu32)(v != v);  // all ones in NaN lanes
  return (rounded & ~nan) | (nan & 0x7FC0u);
}
// 16 floats stored as the weights' dtype.
AMNETS_INLINE void store16(float* p, vfloat v) { store(p, v); }
AMNETS_INLINE void store16(c10::BFloat16* p, vfloat v) {
  const vu16 half = __builtin_convertvector(bf16_bits(v), vu16);
  std::memcpy(p, &half, sizeof half);
}
// v rounded to bf16 precision, as floats (a round trip through c10::BFloat16).
AMNETS_INLINE vfloat round_bf16(vfloat v) {
  const vu32 bits = bf16_bits(v) << 16;
  vfloat out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
// 32 consecutive bf16 weights as floats in pair order, with no widening shuffle: lane l of `even` is weight 2l,
// of `odd` weight 2l + 1 (a bf16 is the high half of a float: shift the low one up, mask the high one). Where
// widening bounds a kernel: load16 of bf16 compiles to two 8-lane widenings and an insert in the avx512f clone.
template <typename T, int N>  // rows of N weights of type T that load_pairs reads
constexpr bool kPairs = std::is_same_v<T, c10::BFloat16> && N % (2 * kWidth) == 0;
AMNETS_INLINE void load_pairs(const c10::BFloat16* p, vfloat& even, vfloat& odd) {
  vu32 bits;
  std::memcpy(&bits, p, sizeof bits);
  const vu32 low = bits << 16, high = bits & 0xFFFF0000u;
  std::memcpy(&even, &low, sizeof even);
  std::memcpy(&odd, &high, sizeof odd);
}
AMNETS_INLINE float scalar(float v) { return v; }
AMNETS_INLINE float scalar(c10::BFloat16 v) { return static_cast<float>(v); }

AMNETS_INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
AMNETS_INLINE vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }
// Pairwise: halves added (8 lanes, then 4), then the last four as two pairs, a dependent chain of 4 adds. The
// lane-by-lane sum was a chain of 16 scalar adds, which a row product with short rows waits on per output
// (lowrank_lstm_cell's U products, rows of r = 48: rows_dot spent most of its time in it).
AMNETS_INLINE float hsum(vfloat v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
AMNETS_INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// 16 x 16 tiles in 16 registers, t[i][m]. Round h (8, 4, 2, 1) pairs register a = t[i] with b = t[i + h]
// (bit h of i clear) and builds two registers from them with two-source shuffles (vpermt2ps on AVX-512,
// round_half): the low one takes lane m of a where bit h of m is 0, else lane m - h of b; the high one lane
// m + h of a, else lane m of b. Storing both exchanges bit h of the register index with bit h of the lane (four rounds: a transposition);
// adding them halves the registers while keeping every register's partial sums apart (four rounds: one
// register whose lane i is register i's sum). Kernels that accumulate (outputs x batch rows) tiles write
// them to row-major y this way: 64 shuffles and 16 stores, where lane-by-lane stores took 256 extracts (29%
// of bsr_linear's time at 16 rows and density 0.1, perf annotate); 16 dot products end in 30 shuffles and
// 15 adds instead of 16 sequential 16-lane sums.
template <int H>
AMNETS_INLINE vint round_mask(bool high) {
  vint mask;
  AMNETS_UNROLL
  for (int m = 0; m < kWidth; ++m) mask[m] = (m & H) ? kWidth + m - (high ? 0 : H) : m + (high ? H : 0);
  return mask;
}
// Lane m of the result: a[mask[m]] where mask[m] < 16, else b[mask[m] - 16] (one vpermt2ps on AVX-512).
AMNETS_INLINE vfloat select2(vfloat a, vfloat b, vint mask) {
#if defined(__clang__)
  vfloat out;
  for (int m = 0; m < kWidth; ++m) out[m] = mask[m] < kWidth ? a[mask[m]] : b[mask[m] - kWidth];
  return out;
#else
  return __builtin_shuffle(a, b, mask);
#endif
}
// Element order to pair order: even = elements 0, 2, .., 30, odd = 1, 3, .., 31 of lo (0-15) followed by hi (16-31).
AMNETS_INLINE void deinterleave(vfloat lo, vfloat hi, vfloat& even, vfloat& odd) {
  vint mask_even, mask_odd;
  AMNETS_UNROLL
  for (int m = 0; m < kWidth; ++m) mask_even[m] = 2 * m, mask_odd[m] = 2 * m + 1;
  even = select2(lo, hi, mask_even), odd = select2(lo, hi, mask_odd);
}
// Back to element order: lo = elements 0-15, hi = 16-31 of the sequence even[0], odd[0], even[1], odd[1], ...
AMNETS_INLINE void interleave(vfloat even, vfloat odd, vfloat& lo, vfloat& hi) {
  vint mask_lo, mask_hi;
  AMNETS_UNROLL
  for (int m = 0; m < kWidth; ++m) {
    mask_lo[m] = (m & 1) * kWidth + m / 2;
    mask_hi[m] = mask_lo[m] + kWidth / 2;
  }
  lo = select2(even, odd, mask_lo), hi = select2(even, odd, mask_hi);
}
// A row of V * 16 bf16 weights (V even) through load_pairs: w[2q], w[2q + 1] hold the even and odd elements
// of its q-th 32; sums accumulated in that order go back to element order through to_element_order.
template <int V>
AMNETS_INLINE void load_row_pairs(const c10::BFloat16* p, vfloat (&w)[V]) {
  AMNETS_UNROLL
  for (int q = 0; q < V / 2; ++q) load_pairs(p + q * 2 * kWidth, w[2 * q], w[2 * q + 1]);
}
template <int V>
AMNETS_INLINE void to_element_order(vfloat (&v)[V]) {
  AMNETS_UNROLL
  for (int q = 0; q < V / 2; ++q) interleave(v[2 * q], v[2 * q + 1], v[2 * q], v[2 * q + 1]);
}
template <int H>
AMNETS_INLINE vfloat round_half(vfloat a, vfloat b, bool high) {
  return select2(a, b, round_mask<H>(high));
}
template <int H>
AMNETS_INLINE void transpose_round(vfloat (&t)[kWidth]) {
  AMNETS_UNROLL
  for (int i = 0; i < kWidth; ++i) {
    if (i & H) continue;
    const vfloat a = t[i], b = t[i + H];
    t[i] = round_half<H>(a, b, false);
    t[i + H] = round_half<H>(a, b, true);
  }
}
AMNETS_INLINE void transpose16(vfloat (&t)[kWidth]) {
  transpose_round<8>(t), transpose_round<4>(t), transpose_round<2>(t), transpose_round<1>(t);
}
template <int H>
AMNETS_INLINE void sum_round(vfloat (&t)[kWidth]) {
  AMNETS_UNROLL
  for (int i = 0; i < H; ++i) t[i] = round_half<H>(t[i], t[i + H], false) + round_half<H>(t[i], t[i + H], true);
}
// Lane i of the result: the sum of t[i]'s lanes (t is used up).
AMNETS_INLINE vfloat hsum16(vfloat (&t)[kWidth]) {
  sum_round<8>(t), sum_round<4>(t), sum_round<2>(t), sum_round<1>(t);
  return t[0];
}

// y[m * ld + i] = t[i][m] for m < rows, i < cols (both at most 16): a tile of accumulators, outputs i by
// batch rows m, into row-major y. Leaves t transposed.
AMNETS_INLINE void store_transposed(vfloat (&t)[kWidth], float* y, int64_t ld, int64_t rows, int64_t cols) {
  transpose16(t);
  for (int64_t m = 0; m < rows; ++m) {
    if (cols == kWidth) {
      store(y + m * ld, t[m]);
    } else {
      for (int64_t i = 0; i < cols; ++i) y[m * ld + i] = t[m][i];
    }
  }
}

// exp(x) to ~1 ulp (Cephes expf): x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n
// by building the float's exponent. Below -87.3 (incl. -inf) the result is exactly 0, above 88 it is
// inf (exp(88) = 1.7e38 is near the float range anyway); NaN stays NaN.
// n = round(x / ln2) by the 1.5 * 2^23 shifter: in x log2(e) + 1.5 * 2^23 the float's low mantissa bits are
// n (two's complement), so the exponent of 2^n comes from those bits with one add and one shift (four
// operations fewer than a truncation corrected to a floor; the LSTM activations are throughput-bound on them).
AMNETS_INLINE vfloat exp(vfloat x) {
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  const vfloat hi = splat(88.0f), lo = splat(-87.3365478515625f);
  const vfloat xc = vmin(vmax(x, lo), hi);
  const vfloat shifted = xc * 1.44269504088896341f + kShifter;
  const vfloat n = shifted - kShifter;
  const vfloat r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vu32 bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits + (127u - 0x4B400000u)) << 23;  // 0x4B400000: the bits of the shifter; 127: the exponent bias
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vfloat y = p * scale;
  y = x < lo ? splat(0.0f) : y;
  y = x > hi ? splat(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;
}

}  // namespace amnets::simd
