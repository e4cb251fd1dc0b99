// CUDA face of rnnt_loss and fused_joint_rnnt_loss. The contract is amnets_kernels/_ops/rnnt.py, the
// math amnets_kernels/reference/rnnt.py, and the structure that of the CPU face (csrc/cpu/rnnt.cpp),
// which this file mirrors function for function: same per-cell arrays, same lattice in double, same
// gradient row, same treatment of dead cells and non-finite costs.
//
// Kernels (every one is shared by both losses):
//   device_labels_kernel  the public ops' label checks on the device (rnnt_device_labels), one launch.
//   row_stats_kernel  one warp per lattice cell (b, t, u): a streaming pass over the V logits of the cell
//                     (16-byte loads where the row allows, an online max / sum-exp per lane, warp
//                     shuffles to combine) gives den = logsumexp, lp_blank and lp_y. Dead cells get
//                     the fill values (den 0, log-probs -inf) without reading their logits.
//   lattice_kernel    one block per sequence and direction (alpha of b and beta of b run concurrently):
//                     an anti-diagonal wavefront over t + u, threads over u, one __syncthreads per
//                     diagonal, the previous diagonal kept in double in shared memory (or in a global
//                     scratch when U+1 is too long for 48 KB). Writes -inf outside the lattice.
//   gradient_kernel   one warp per cell: the per-row gradient of Saved::gradient_row in the CPU face
//                     (occupancy * softmax, minus the posteriors of the blank and label arcs, clamp on
//                     each final entry, then scale), or a zero row for dead cells and for sequences
//                     whose log P is not finite.
//   joint_activation_kernel / joint_scatter_kernel  fused_joint only: build act(enc[b,t] + pred[b,u]) for
//                     a chunk of live cells; after the GEMMs, multiply dA by act' and add the rows into
//                     grad_enc[b,t] and grad_pred[b,u] with fp32/fp64 atomics.
// fused_joint_rnnt_loss processes every lattice cell, in order, in chunks of rows: A = act(...) (rows, H),
// logits = A W^T + b by cuBLAS (rows, V), then the row kernels above on those rows through the row -> cell
// map. A dead cell (t >= T_b or u > U_b), and in backward a cell of a sequence with a non-finite cost, has
// A = 0 and a zero gradient row and scatters nothing, so padding (which may hold anything) never reaches a
// gradient. (Enumerating only the live cells would skip the padding's GEMM rows, but knowing how many there
// are is a host sync, which would rule out CUDA graphs.) Backward recomputes
// each chunk and overwrites its logits with their gradient (flash-attention style), so no (B, T, U+1, V)
// tensor ever exists.
//
// Limits, by design:
//   - One warp per row for any V: fine while B*T*(U+1) is large (the usual case); a batch with very few
//     cells and a huge V leaves the GPU mostly idle.
//   - The lattice runs T_b + U_b dependent steps per sequence, each a barrier and a double logaddexp.
//   - --use_fast_math maps expf/logf to the approximate intrinsics in the float row passes (errors far
//     below the tolerances the tests use; the lattice and the arc posteriors are computed in double).
//   - Atomic accumulation makes grad_enc / grad_pred (and cuBLAS's own choices) not bitwise reproducible.
//   - fp32 GEMMs follow torch.backends.cuda.matmul.allow_tf32 like every at::mm (off by default).
//   - At most 2^31 - 1 lattice cells B*T*(U+1) (checked): cell indices split with 32-bit division.
//   - Host syncs: none here; the op around them (csrc/rnnt.cpp) checks labels and lengths on the device by
//     default on CUDA tensors (its host checks, which wait, are opt-in).
//   - The joint's GEMMs run over the padding's cells too: a batch with much padding pays for it.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

namespace amnets::cuda {
namespace {

using at::Tensor;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;      // 8 warps per block for the warp-per-row kernels
constexpr int kLatticeThreads = 512;  // most threads a lattice block gets (threads run over u)
constexpr int kJointThreads = 256;    // threads over H in the joint's element kernels
constexpr int64_t kDiagonalSharedBytes = 48 * 1024;  // beyond this the diagonals live in global scratch

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Enough blocks to fill every SM (8 resident blocks of 256 threads each), no more: kernels grid-stride.
int64_t blocks_for(int64_t work_items, int64_t items_per_block) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(ceil_div(work_items, items_per_block), sms * 8));
}

// ---------------------------------------------------------------------------------------------------
// Device math in the accumulation type (float or double). Under --use_fast_math the float versions
// become the hardware approximations; double is unaffected.

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
// Not tanhf: --use_fast_math turns it into tanh.approx.f32 (relative error ~5e-4), too coarse for the
// fp32 joint. 2 / (1 + e^-2x) - 1 with __expf is within a few ulp of tanh (as the CPU face computes it).
__device__ __forceinline__ float tanh_acc(float x) { return 2.0f / (1.0f + __expf(-2.0f * x)) - 1.0f; }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// std::clamp's semantics: NaN passes through (fminf/fmaxf would swallow it).
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_to(acc_t v, acc_t bound) {
  return v < -bound ? -bound : (v > bound ? bound : v);
}

// As the CPU face: log(e^a + e^b) in double, -inf for (-inf, -inf) rather than NaN.
__device__ __forceinline__ double logaddexp(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  return fmax(a, b) + log1p(exp(-fabs(a - b)));
}

// ---------------------------------------------------------------------------------------------------
// One warp walks a row of n elements: the unaligned head (fewer than a pack, one element per lane),
// then 16-byte packs of the aligned body (pack i to lane i % 32), then the tail (fewer than a pack). A
// row may start anywhere (V need not be a multiple of the pack), and an input and output row can
// share packs only when they agree modulo 16 bytes; otherwise the whole row goes element by element.
// Each element belongs to exactly one lane (RowLayout::owner), which reads it before it writes it, so
// `in` and `out` may be the same row.

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
struct RowLayout {
  static constexpr int kPack = Pack<T>::kSize;
  static_assert(kPack <= kWarp, "head and tail take one element per lane");
  bool packable;
  int64_t head, packs, tail;  // elements [0, head), packs of [head, tail), elements [tail, n)

  // `anchor` is the row read (or written when nothing is read); `other`, if any, must agree with it.
  __device__ RowLayout(const void* anchor, const void* other, int64_t n) {
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(anchor) % 16;
    packable = misalign % sizeof(T) == 0 && (other == nullptr || reinterpret_cast<uintptr_t>(other) % 16 == misalign);
    head = packable ? min(n, static_cast<int64_t>((16 - misalign) % 16 / sizeof(T))) : n;
    packs = (n - head) / kPack;
    tail = head + packs * kPack;
  }
  // The lane that visits element k.
  __device__ int owner(int64_t k) const {
    if (!packable) return int(k % kWarp);
    if (k < head) return int(k);
    if (k < tail) return int((k - head) / kPack % kWarp);
    return int(k - tail);
  }
};

// f(k, x) gets element k in the accumulation type (0 when not kLoad) and returns the value to store
// (ignored when not kStore).
template <bool kLoad, bool kStore, typename T, typename F>
__device__ __forceinline__ void row_pass(const RowLayout<T>& layout, const T* in, T* out, int64_t n, F&& f) {
  using acc_t = at::opmath_type<T>;
  constexpr int kPack = RowLayout<T>::kPack;
  const int lane = threadIdx.x % kWarp;
  auto one = [&](int64_t k) {
    acc_t x = acc_t(0);
    if constexpr (kLoad) x = static_cast<acc_t>(in[k]);
    const acc_t y = f(k, x);
    if constexpr (kStore) out[k] = static_cast<T>(y);
  };
  if (!layout.packable) {
    for (int64_t k = lane; k < n; k += kWarp) one(k);
    return;
  }
  if (lane < layout.head) one(lane);
  for (int64_t i = lane; i < layout.packs; i += kWarp) {
    const int64_t k0 = layout.head + i * kPack;
    Pack<T> p;
    if constexpr (kLoad) p = *reinterpret_cast<const Pack<T>*>(in + k0);
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      acc_t x = acc_t(0);
      if constexpr (kLoad) x = static_cast<acc_t>(p.v[j]);
      const acc_t y = f(k0 + j, x);
      if constexpr (kStore) p.v[j] = static_cast<T>(y);
    }
    if constexpr (kStore) *reinterpret_cast<Pack<T>*>(out + k0) = p;
  }
  if (layout.tail + lane < n) one(layout.tail + lane);
}

// logsumexp of a row, warp-collective (every lane returns it). Each lane keeps a running max m and
// sum s of exp(x - m) over its elements, then the lanes merge pairwise. -inf entries add nothing (their
// exp(-inf - -inf) would be NaN); a +inf or NaN logit gives NaN, like the CPU face.
template <typename T>
__device__ at::opmath_type<T> warp_row_logsumexp(const T* row, int64_t n) {
  using acc_t = at::opmath_type<T>;
  acc_t m = neg_inf<acc_t>(), s = acc_t(0);
  row_pass<true, false>(RowLayout<T>(row, nullptr, n), row, static_cast<T*>(nullptr), n, [&](int64_t, acc_t x) {
    if (x > m) {
      s = s * exp_acc(m - x) + acc_t(1);
      m = x;
    } else if (x != neg_inf<acc_t>()) {
      s += exp_acc(x - m);
    }
    return x;
  });
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    const acc_t top = m2 > m ? m2 : m;
    s = (m == neg_inf<acc_t>() ? acc_t(0) : s * exp_acc(m - top)) +
        (m2 == neg_inf<acc_t>() ? acc_t(0) : s2 * exp_acc(m2 - top));
    m = top;
  }
  // All -inf: log 0. A +inf (or NaN) logit: NaN, so that the sequence's cost is NaN as on every face.
  if (isfinite(m)) return m + log_acc(s);
  return m == neg_inf<acc_t>() ? m : acc_t(NAN);
}

// The grid-stride loop of the warp-per-row kernels: body(r) for each row r owned by this warp. The loop
// bound is warp-uniform, so the shuffles inside the body see all 32 lanes.
template <typename Body>
__device__ __forceinline__ void for_each_row_of_warp(int64_t rows, Body&& body) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; r < rows; r += warps) {
    body(r);
  }
}

// ---------------------------------------------------------------------------------------------------
// The lattice. Per-cell arrays are (B, T, U+1) contiguous; sequence b owns the block at b*T*(U+1).

struct Cell {
  int64_t b, t, u, index;
};

// Sizes and the device pointers to lengths and targets; passed by value to every kernel. Cell indices
// are below 2^31 (lattice_of checks it), so they split with 32-bit division: 64-bit division is a
// subroutine call, slow, and its calling convention made ptxas spill.
struct Lattice {
  int64_t batch, frames, labels_plus_1;  // padded B, T, U+1
  const int32_t* frames_of;              // T_b
  const int32_t* labels_of;              // U_b
  const int32_t* targets;                // (B, U) labels; entries at u >= U_b are never read

  __host__ __device__ int64_t cells() const { return frames * labels_plus_1; }
  __device__ Cell at(int64_t index) const {
    const uint32_t i = uint32_t(index), width = uint32_t(labels_plus_1), row = i / width;  // row = b*T + t
    return {row / uint32_t(frames), row % uint32_t(frames), i - row * width, index};
  }
  __device__ bool live(const Cell& c) const { return c.t < frames_of[c.b] && c.u <= labels_of[c.b]; }
  // y_{u+1}, or -1 at u = U_b (no label arc leaves the last row).
  __device__ int64_t label(int64_t b, int64_t u) const {
    return u < labels_of[b] ? targets[b * (labels_plus_1 - 1) + u] : -1;
  }
  __device__ int64_t enc_row(const Cell& c) const { return c.b * frames + c.t; }
  __device__ int64_t pred_row(const Cell& c) const { return c.b * labels_plus_1 + c.u; }
};

Lattice lattice_of(int64_t batch, int64_t frames, int64_t labels_plus_1, const Tensor& targets,
                   const Tensor& logit_lengths, const Tensor& target_lengths) {
  for (const Tensor* t : {&targets, &logit_lengths, &target_lengths}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kInt && t->is_contiguous(),
                "rnnt (cuda): targets and lengths must be contiguous int32 CUDA tensors");
  }
  TORCH_CHECK(batch * frames * labels_plus_1 <= std::numeric_limits<int32_t>::max(),
              "rnnt (cuda): at most 2^31 - 1 lattice cells (B * T * (U+1)); got ", batch * frames * labels_plus_1);
  // Shapes only: their values are on the device (the public ops check them before calling this face).
  checks::shape("rnnt (cuda)", "targets", targets, {batch, labels_plus_1 - 1});
  checks::shape("rnnt (cuda)", "logit_lengths", logit_lengths, {batch});
  checks::shape("rnnt (cuda)", "target_lengths", target_lengths, {batch});
  return {batch, frames, labels_plus_1, logit_lengths.data_ptr<int32_t>(), target_lengths.data_ptr<int32_t>(),
          targets.data_ptr<int32_t>()};
}

// ---------------------------------------------------------------------------------------------------
// rnnt_device_labels: the public ops' label checks on the device (csrc/rnnt.cpp device_labels, whose tensor ops
// are the specification) in one launch instead of 28. One block per sequence, threads over its labels; the
// comparisons are made in int64, before narrowing, as there.

constexpr int kLabelThreads = 256;

__device__ __forceinline__ int64_t index_at(const void* data, bool wide, int64_t i) {
  return wide ? static_cast<const int64_t*>(data)[i] : int64_t(static_cast<const int32_t*>(data)[i]);
}

struct IndexIn {
  const void* data;
  bool wide;  // int64, else int32
};

IndexIn index_in(const Tensor& t) { return {t.data_ptr(), t.scalar_type() == at::kLong}; }

__global__ void __launch_bounds__(kLabelThreads)
    device_labels_kernel(IndexIn targets, IndexIn frames, IndexIn labels, int64_t batch, int64_t max_labels,
                         int64_t max_frames, int64_t vocab, int64_t blank, int32_t* __restrict__ targets_out,
                         int32_t* __restrict__ frames_out, int32_t* __restrict__ labels_out,
                         bool* __restrict__ bad_out) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {  // the same b for the whole block: the barrier is safe
    const int64_t f = index_at(frames.data, frames.wide, b), l = index_at(labels.data, labels.wide, b);
    bool bad_label = false;
    for (int64_t u = threadIdx.x; u < max_labels; u += blockDim.x) {
      const int64_t i = b * max_labels + u, y = index_at(targets.data, targets.wide, i);
      bad_label = bad_label || (u < l && (y < 0 || y >= vocab || y == blank));
      targets_out[i] = int32_t(min(max(y, int64_t(0)), vocab - 1));
    }
    const bool bad = __syncthreads_or(bad_label) || f < 1 || f > max_frames || l < 0 || l > max_labels;
    if (threadIdx.x == 0) {
      bad_out[b] = bad;
      frames_out[b] = bad ? 1 : int32_t(f);
      labels_out[b] = bad ? 0 : int32_t(l);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnnt_device_labels(const Tensor& targets_in, const Tensor& frames_in,
                                                              const Tensor& labels_in, int64_t max_frames,
                                                              int64_t vocab, int64_t blank, c10::string_view op_name) {
  const std::string op(op_name);
  checks::rnnt_device_labels_args(op.c_str(), targets_in, frames_in, labels_in, max_frames, vocab, blank);
  const c10::cuda::CUDAGuard guard(targets_in.device());
  const Tensor targets = targets_in.contiguous(), frames = frames_in.contiguous(), labels = labels_in.contiguous();
  const int64_t batch = targets.size(0), max_labels = targets.size(1);
  const auto opts = targets.options().dtype(at::kInt);
  Tensor targets_out = at::empty({batch, max_labels}, opts), frames_out = at::empty({batch}, opts),
         labels_out = at::empty({batch}, opts), bad = at::empty({batch}, opts.dtype(at::kBool));
  const int threads = int(std::min<int64_t>(kLabelThreads, std::max<int64_t>(1, ceil_div(max_labels, kWarp)) * kWarp));
  device_labels_kernel<<<std::min<int64_t>(batch, 65535), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      index_in(targets), index_in(frames), index_in(labels), batch, max_labels, max_frames, vocab, blank,
      targets_out.data_ptr<int32_t>(), frames_out.data_ptr<int32_t>(), labels_out.data_ptr<int32_t>(),
      bad.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {targets_out, frames_out, labels_out, bad};
}

// ---------------------------------------------------------------------------------------------------
// Forward per cell: den, lp_blank, lp_y. Row r of `rows` belongs to cell cell_of_row[r] (or r itself
// when there is no map: rnnt_loss's logits are the full padded lattice, the joint's chunk a range of cells).

template <typename acc_t>
struct CellOut {
  acc_t *den, *blank, *label;
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    row_stats_kernel(const T* rows, const int64_t* cell_of_row, int64_t n_rows, int64_t vocab, Lattice lat,
                     int64_t blank, bool fused, CellOut<at::opmath_type<T>> out) {
  using acc_t = at::opmath_type<T>;
  for_each_row_of_warp(n_rows, [&](int64_t r) {
    const Cell c = lat.at(cell_of_row ? cell_of_row[r] : r);
    if (!lat.live(c)) {  // its logits are never read; the fill values the CPU face gives dead cells
      if (threadIdx.x % kWarp == 0) {
        out.den[c.index] = acc_t(0);
        out.blank[c.index] = out.label[c.index] = neg_inf<acc_t>();
      }
      return;
    }
    const T* row = rows + r * vocab;
    const acc_t den = fused ? warp_row_logsumexp(row, vocab) : acc_t(0);
    if (threadIdx.x % kWarp == 0) {
      const int64_t label = lat.label(c.b, c.u);
      out.den[c.index] = den;
      out.blank[c.index] = static_cast<acc_t>(row[blank]) - den;
      out.label[c.index] = label >= 0 ? static_cast<acc_t>(row[label]) - den : neg_inf<acc_t>();
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// alpha and beta by anti-diagonals: cell (t, u) of diagonal d = t + u needs only diagonal d - 1 (alpha)
// or d + 1 (beta), so a diagonal's cells are independent and one barrier per diagonal orders them. The
// two newest diagonals live in `diag` (double, indexed by u, by parity of the step): the recursion runs
// in double like the CPU face, and the stored alphas/betas are rounded copies.
// Block x < B: alpha of sequence x and its cost. Block B + b (only when betas are wanted): beta of b.

template <typename scalar_t>
__global__ void __launch_bounds__(kLatticeThreads)
    lattice_kernel(Lattice lat, const at::opmath_type<scalar_t>* lp_blank, const at::opmath_type<scalar_t>* lp_y,
                   at::opmath_type<scalar_t>* alphas, at::opmath_type<scalar_t>* betas, scalar_t* costs,
                   double* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char lattice_shared[];
  const bool beta_pass = blockIdx.x >= lat.batch;
  const int64_t b = beta_pass ? blockIdx.x - lat.batch : blockIdx.x;
  const int64_t frames = lat.frames_of[b], labels = lat.labels_of[b], width = lat.labels_plus_1;
  const int64_t seq = b * lat.cells();
  acc_t* out = beta_pass ? betas : alphas;  // null when the forward keeps no workspace

  // -inf off the lattice; the wavefront writes every live cell, so the two never touch the same entry.
  if (out != nullptr) {
    for (uint32_t i = threadIdx.x; i < uint32_t(lat.cells()); i += blockDim.x) {
      const uint32_t t = i / uint32_t(width), u = i - t * uint32_t(width);
      if (t >= frames || u > labels) out[seq + i] = neg_inf<acc_t>();
    }
  }

  double* diag = scratch != nullptr ? scratch + blockIdx.x * 2 * width : reinterpret_cast<double*>(lattice_shared);
  const int64_t last = frames - 1 + labels;  // diagonals 0 .. last; the last holds only (T_b-1, U_b)
  for (int64_t step = 0; step <= last; ++step) {
    const int64_t d = beta_pass ? last - step : step;
    double* cur = diag + (step & 1) * width;
    const double* prev = diag + ((step & 1) ^ 1) * width;  // written at step - 1, behind the barrier
    const int64_t lo = max(int64_t(0), d - (frames - 1)), hi = min(d, labels);
    for (int64_t u = lo + threadIdx.x; u <= hi; u += blockDim.x) {
      const int64_t t = d - u, cell = seq + t * width + u;
      double v;
      if (!beta_pass) {
        const double stay = t > 0 ? prev[u] + double(lp_blank[cell - width]) : kNegInf;
        const double emit = u > 0 ? prev[u - 1] + double(lp_y[cell - 1]) : kNegInf;
        v = step == 0 ? 0.0 : logaddexp(stay, emit);
      } else {
        const double stay = t + 1 < frames ? prev[u] + double(lp_blank[cell]) : kNegInf;
        const double emit = u < labels ? prev[u + 1] + double(lp_y[cell]) : kNegInf;
        v = step == 0 ? double(lp_blank[cell]) : logaddexp(stay, emit);
      }
      cur[u] = v;
      if (out != nullptr) out[cell] = static_cast<acc_t>(v);
      // cost_b = -log P = -(alpha(T_b-1, U_b) + lp_blank(T_b-1, U_b)), from the unrounded alpha.
      if (!beta_pass && step == last) costs[b] = static_cast<scalar_t>(static_cast<acc_t>(-(v + double(lp_blank[cell]))));
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward per cell: Saved::gradient_row of the CPU face, one warp per row.

// What backward reads of the forward, as device pointers.
template <typename acc_t>
struct Saved {
  const acc_t *alpha, *beta, *den;
  const double* scale;  // grad_costs in double, (B,)
  int64_t blank;
  acc_t bound;  // the clamp, or +inf
  bool fused;
};

// out[k] = d(cost_b)/d(logit k of cell) * scale: every class gets occupancy * softmax (when fused),
// blank and the next label lose their arc's posterior; the clamp bounds each final entry. As in the CPU
// face, one pass writes the common part and then the two arc entries are recomputed in double and
// overwritten, each by the lane that owns it in the pass: that lane reads the arc logit before the pass
// (`in` may be `out`: the joint overwrites its logits with their gradient) and overwrites the entry
// after it, in its own program order, with no barrier. A dead cell or a sequence whose log P is not
// finite gets a zero row.
template <typename T>
__device__ void gradient_row(const T* in, T* out, int64_t vocab, const Lattice& lat, const Cell& c,
                             const Saved<at::opmath_type<T>>& sv) {
  using acc_t = at::opmath_type<T>;
  const double lp = sv.beta[c.b * lat.cells()];  // log P = beta(0, 0); the saved costs may be fp16
  if (!lat.live(c) || !isfinite(lp)) {
    row_pass<false, true>(RowLayout<T>(out, nullptr, vocab), in, out, vocab, [](int64_t, acc_t) { return acc_t(0); });
    return;
  }
  const RowLayout<T> layout(in, out, vocab);
  const int lane = threadIdx.x % kWarp;
  const int64_t label = lat.label(c.b, c.u);
  const bool fix_blank = layout.owner(sv.blank) == lane, fix_label = label >= 0 && layout.owner(label) == lane;
  const double z_blank = fix_blank ? double(static_cast<acc_t>(in[sv.blank])) : 0.0;
  const double z_label = fix_label ? double(static_cast<acc_t>(in[label])) : 0.0;

  const double a = sv.alpha[c.index], d = sv.den[c.index], scale = sv.scale[c.b];
  const double occupancy = sv.fused ? exp(a + double(sv.beta[c.index]) - lp) : 0.0;
  // Not fused: the input is already log-probs and only the two arc entries depend on it.
  const acc_t occupancy_acc = acc_t(occupancy), den = acc_t(d), scale_acc = acc_t(scale);
  row_pass<true, true>(layout, in, out, vocab, [&](int64_t, acc_t z) {
    const acc_t soft = sv.fused ? occupancy_acc * exp_acc(z - den) : acc_t(0);
    return clamp_to(soft, sv.bound) * scale_acc;
  });

  auto fix = [&](int64_t k, double z, double log_arc) {
    const double soft = sv.fused ? occupancy * exp(z - d) : 0.0;
    out[k] = static_cast<T>(acc_t(clamp_to(soft - exp(a + z - d + log_arc - lp), double(sv.bound)) * scale));
  };
  if (fix_blank) {
    const int64_t frames = lat.frames_of[c.b], labels = lat.labels_of[c.b];
    fix(sv.blank, z_blank,
        c.t + 1 < frames ? double(sv.beta[c.index + lat.labels_plus_1]) : (c.u == labels ? 0.0 : kNegInf));
  }
  if (fix_label) fix(label, z_label, double(sv.beta[c.index + 1]));  // label >= 0: u < U_b
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    gradient_kernel(const T* in, T* out, const int64_t* cell_of_row, int64_t n_rows, int64_t vocab, Lattice lat,
                    Saved<at::opmath_type<T>> sv) {
  for_each_row_of_warp(n_rows, [&](int64_t r) {
    gradient_row(in + r * vocab, out + r * vocab, vocab, lat, lat.at(cell_of_row ? cell_of_row[r] : r), sv);
  });
}

// ---------------------------------------------------------------------------------------------------
// Host side: launches and the per-cell arrays, shared by both losses.

template <typename T>
void launch_row_stats(const T* rows, const int64_t* cell_of_row, int64_t n_rows, int64_t vocab, const Lattice& lat,
                      int64_t blank, bool fused, CellOut<at::opmath_type<T>> out) {
  if (n_rows == 0) return;
  row_stats_kernel<T><<<blocks_for(n_rows, kRowThreads / kWarp), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      rows, cell_of_row, n_rows, vocab, lat, blank, fused, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_gradient(const T* in, T* out, const int64_t* cell_of_row, int64_t n_rows, int64_t vocab,
                     const Lattice& lat, const Saved<at::opmath_type<T>>& sv) {
  if (n_rows == 0) return;
  gradient_kernel<T><<<blocks_for(n_rows, kRowThreads / kWarp), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      in, out, cell_of_row, n_rows, vocab, lat, sv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// alphas (may be undefined: only the costs are wanted), betas (undefined when not saved), costs.
template <typename scalar_t>
void launch_lattice(const Lattice& lat, const Tensor& lp_blank, const Tensor& lp_y, Tensor& alphas, Tensor& betas,
                    Tensor& costs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks = betas.defined() ? 2 * lat.batch : lat.batch;
  const int64_t diag_bytes = 2 * lat.labels_plus_1 * int64_t(sizeof(double));
  const bool in_shared = diag_bytes <= kDiagonalSharedBytes;
  Tensor scratch = in_shared ? Tensor() : at::empty({blocks, 2 * lat.labels_plus_1}, lp_blank.options().dtype(at::kDouble));
  // A diagonal has at most min(T, U+1) cells: no more threads than that, in whole warps.
  const int64_t longest = std::min(lat.frames, lat.labels_plus_1);
  const int threads = int(std::min<int64_t>(kLatticeThreads, ceil_div(longest, kWarp) * kWarp));
  lattice_kernel<scalar_t><<<blocks, threads, in_shared ? diag_bytes : 0, at::cuda::getCurrentCUDAStream()>>>(
      lat, lp_blank.data_ptr<acc_t>(), lp_y.data_ptr<acc_t>(), alphas.defined() ? alphas.data_ptr<acc_t>() : nullptr,
      betas.defined() ? betas.data_ptr<acc_t>() : nullptr, costs.data_ptr<scalar_t>(),
      in_shared ? nullptr : scratch.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-cell buffers of the forward: den, lp_blank, lp_y (B, T, U+1) in the accumulation dtype. Both losses run
// row_stats_kernel over every cell, and it writes dead cells the CPU face's fill values (den 0, log-probs -inf):
// no fill launches here.
struct CellArrays {
  Tensor den, blank, label;
  CellArrays(const Lattice& lat, at::ScalarType acc, const at::TensorOptions& opts)
      : den(at::empty({lat.batch, lat.frames, lat.labels_plus_1}, opts.dtype(acc))),
        blank(at::empty_like(den)),
        label(at::empty_like(den)) {}
  template <typename acc_t>
  CellOut<acc_t> out() {
    return {den.data_ptr<acc_t>(), blank.data_ptr<acc_t>(), label.data_ptr<acc_t>()};
  }
};

// alphas/betas/costs from the cell arrays; the op's forward outputs.
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> finish_forward(const Lattice& lat, CellArrays& cells,
                                                         const at::TensorOptions& cost_opts, bool save) {
  Tensor alphas = save ? at::empty_like(cells.den) : Tensor(), betas = save ? at::empty_like(cells.den) : Tensor();
  Tensor costs = at::empty({lat.batch}, cost_opts);
  launch_lattice<scalar_t>(lat, cells.blank, cells.label, alphas, betas, costs);
  if (!save) {
    auto none = at::empty({0}, cells.den.options());
    return {costs, none, none.clone(), none.clone()};
  }
  return {costs, alphas, betas, cells.den};
}

template <typename acc_t>
Saved<acc_t> saved_of(const Tensor& alphas, const Tensor& betas, const Tensor& den, const Tensor& scales,
                      int64_t blank, double clamp, bool fused) {
  return {alphas.data_ptr<acc_t>(), betas.data_ptr<acc_t>(), den.data_ptr<acc_t>(), scales.data_ptr<double>(),
          blank, clamp > 0 ? acc_t(clamp) : std::numeric_limits<acc_t>::infinity(), fused};
}

// ---------------------------------------------------------------------------------------------------
// rnnt_loss

std::tuple<Tensor, Tensor, Tensor, Tensor> rnnt_loss_forward(const Tensor& logits, const Tensor& targets,
                                                             const Tensor& logit_lengths,
                                                             const Tensor& target_lengths, int64_t blank,
                                                             double /*clamp*/, bool fused_log_softmax, bool save) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor z = logits.contiguous();
  const Lattice lat = lattice_of(z.size(0), z.size(1), z.size(2), targets, logit_lengths, target_lengths);
  const int64_t vocab = z.size(3);
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "rnnt_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CellArrays cells(lat, c10::CppTypeToScalarType<acc_t>::value, z.options());
    launch_row_stats(z.data_ptr<scalar_t>(), nullptr, lat.batch * lat.cells(), vocab, lat, blank, fused_log_softmax,
                     cells.out<acc_t>());
    out = finish_forward<scalar_t>(lat, cells, z.options(), save);
  });
  return out;
}

Tensor rnnt_loss_backward(const Tensor& grad_costs, const Tensor& logits, const Tensor& targets,
                          const Tensor& logit_lengths, const Tensor& target_lengths, const Tensor& /*costs*/,
                          const Tensor& alphas, const Tensor& betas, const Tensor& den, int64_t blank,
                          double clamp, bool fused_log_softmax) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor z = logits.contiguous();
  const Lattice lat = lattice_of(z.size(0), z.size(1), z.size(2), targets, logit_lengths, target_lengths);
  const int64_t vocab = z.size(3);
  Tensor grad = at::empty(z.sizes(), z.options());  // every row is written: gradient or zeros
  const Tensor scales = grad_costs.to(at::kDouble).contiguous();  // a broadcast grad has stride 0
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "rnnt_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor alpha = alphas.to(acc).contiguous(), beta = betas.to(acc).contiguous(),
                 norm = den.to(acc).contiguous();  // no copy when already acc and contiguous
    launch_gradient(z.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), nullptr, lat.batch * lat.cells(), vocab,
                    lat, saved_of<acc_t>(alpha, beta, norm, scales, blank, clamp, fused_log_softmax));
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------------
// fused_joint_rnnt_loss: the logits of the live cells, a chunk of rows at a time. Rows enumerate live
// cells in (b, t, u) order, so the rows of one (b, t) are consecutive (the scatter relies on it).

enum class Activation : int { kIdentity, kTanh, kRelu };

Activation activation_of(c10::string_view name) {
  if (name == "tanh") return Activation::kTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(name == "identity", "fused_joint_rnnt_loss (cuda): unknown activation ", std::string(name));
  return Activation::kIdentity;
}

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t x, Activation act) {
  if (act == Activation::kTanh) return tanh_acc(x);
  if (act == Activation::kRelu) return x < acc_t(0) ? acc_t(0) : x;  // NaN passes, as torch.relu
  return x;
}

// d(act)/d(pre) expressed through the activation's output y.
template <typename acc_t>
__device__ __forceinline__ acc_t activation_slope(acc_t y, Activation act) {
  if (act == Activation::kTanh) return acc_t(1) - y * y;
  if (act == Activation::kRelu) return y > acc_t(0) ? acc_t(1) : acc_t(0);
  return acc_t(1);
}

// Whether the joint computes cell c: live, and (in backward) of a sequence whose cost is finite (keep[b];
// keep == nullptr: every sequence).
__device__ __forceinline__ bool joint_cell(const Lattice& lat, const Cell& c, const bool* keep) {
  return lat.live(c) && (keep == nullptr || keep[c.b]);
}

// A[r] = act(enc[b, t] + pred[b, u]) for the cell of row r, 0 for a cell the joint skips (its enc / pred rows
// are padding or belong to a non-finite sequence: never read); a block per row, threads over H.
template <typename acc_t>
__global__ void __launch_bounds__(kJointThreads)
    joint_activation_kernel(const acc_t* __restrict__ enc, const acc_t* __restrict__ pred,
                            const int64_t* __restrict__ cell_of_row, int64_t rows, int64_t hidden, Lattice lat,
                            const bool* __restrict__ keep, Activation act, acc_t* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const Cell c = lat.at(cell_of_row[r]);
    if (!joint_cell(lat, c, keep)) {
      for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) out[r * hidden + h] = acc_t(0);
      continue;
    }
    const acc_t* e = enc + lat.enc_row(c) * hidden;
    const acc_t* p = pred + lat.pred_row(c) * hidden;
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) out[r * hidden + h] = activate(e[h] + p[h], act);
  }
}

// grad_enc[b, t] += dA[r], grad_pred[b, u] += dA[r] with dA = dZ * act'(A), for the cells the joint computes.
// Each block owns a contiguous range of rows; a thread keeps a running sum for its h while consecutive rows
// share (b, t), so grad_enc gets one atomic per (b, t) run instead of one per row. grad_pred gets one per row.
template <typename acc_t>
__global__ void __launch_bounds__(kJointThreads)
    joint_scatter_kernel(const acc_t* __restrict__ grad_act, const acc_t* __restrict__ act_out,
                         const int64_t* __restrict__ cell_of_row, int64_t rows, int64_t hidden, Lattice lat,
                         const bool* __restrict__ keep, Activation act, acc_t* grad_enc, acc_t* grad_pred) {
  const uint32_t per_block = (uint32_t(rows) + gridDim.x - 1) / gridDim.x;  // rows <= kMaxChunkRows
  const int64_t begin = int64_t(blockIdx.x) * per_block, end = min(rows, begin + per_block);
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    acc_t run = acc_t(0);
    int64_t run_row = -1;
    for (int64_t r = begin; r < end; ++r) {
      const Cell c = lat.at(cell_of_row[r]);
      if (!joint_cell(lat, c, keep)) continue;  // its dA is 0 (or NaN from an inf weight): nothing to add
      const int64_t enc_row = lat.enc_row(c);
      const acc_t g = grad_act[r * hidden + h] * activation_slope(act_out[r * hidden + h], act);
      if (enc_row != run_row) {
        if (run_row >= 0) atomicAdd(grad_enc + run_row * hidden + h, run);
        run = acc_t(0);
        run_row = enc_row;
      }
      run += g;
      atomicAdd(grad_pred + lat.pred_row(c) * hidden + h, g);
    }
    if (run_row >= 0) atomicAdd(grad_enc + run_row * hidden + h, run);
  }
}

// Rows per chunk: as many as keep the GPU busy, bounded so that the chunk's buffers (logits (rows, V),
// activations and their gradient (rows, H) each) stay under kChunkBytes.
constexpr int64_t kMaxChunkRows = 16384;
constexpr int64_t kChunkBytes = int64_t(256) << 20;

int64_t chunk_rows(int64_t live, int64_t vocab, int64_t hidden, int64_t elem_bytes) {
  const int64_t fit = kChunkBytes / ((vocab + 2 * hidden) * elem_bytes);
  return std::max<int64_t>(1, std::min({live, kMaxChunkRows, fit}));
}

// The row -> cell map of the joint: every cell of the lattice, in order (the kernels skip the dead ones).
Tensor all_cells(const Lattice& lat, const Tensor& like) {
  return at::arange(lat.batch * lat.cells(), like.options().dtype(at::kLong));
}

struct Joint {
  Tensor enc, pred, weight, bias;  // in the accumulation dtype, contiguous; bias may be undefined
  Activation activation;
  int64_t hidden, vocab;

  Joint(const Tensor& e, const Tensor& p, const Tensor& w, const c10::optional<Tensor>& b, at::ScalarType acc,
        c10::string_view act)
      : enc(e.to(acc).contiguous()), pred(p.to(acc).contiguous()), weight(w.to(acc).contiguous()),
        bias(b.has_value() ? b->to(acc).contiguous() : Tensor()), activation(activation_of(act)),
        hidden(e.size(2)), vocab(w.size(0)) {}

  // The activations (rows, H) and logits (rows, V) of the cells cell_of_row[0 .. rows), into the first
  // rows of the chunk buffers `act` and `logits`; keep: joint_cell's.
  template <typename acc_t>
  void tile(const Lattice& lat, const int64_t* cell_of_row, int64_t rows, const bool* keep, const Tensor& act,
            const Tensor& logits) const {
    joint_activation_kernel<acc_t><<<blocks_for(rows, 1), kJointThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        enc.data_ptr<acc_t>(), pred.data_ptr<acc_t>(), cell_of_row, rows, hidden, lat, keep, activation,
        act.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor out = logits;  // a view of the chunk buffer; the _out ops write through it
    if (bias.defined()) {
      at::addmm_out(out, bias, act, weight.t());
    } else {
      at::mm_out(out, act, weight.t());
    }
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_joint_rnnt_loss_forward(
    const Tensor& enc, const Tensor& pred, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& targets, const Tensor& logit_lengths, const Tensor& target_lengths, int64_t blank,
    c10::string_view activation, double /*clamp*/, bool save) {
  const c10::cuda::CUDAGuard guard(enc.device());
  const Lattice lat = lattice_of(enc.size(0), enc.size(1), pred.size(1), targets, logit_lengths, target_lengths);
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, enc.scalar_type(), "fused_joint_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Joint joint(enc, pred, weight, bias, acc, activation);
    CellArrays cells(lat, acc, enc.options());
    const Tensor cell_map = all_cells(lat, enc);
    const int64_t total = cell_map.numel();
    const int64_t chunk = chunk_rows(total, joint.vocab, joint.hidden, sizeof(acc_t));
    const Tensor act = at::empty({chunk, joint.hidden}, joint.enc.options());
    const Tensor logits = at::empty({chunk, joint.vocab}, joint.enc.options());
    for (int64_t r0 = 0; r0 < total; r0 += chunk) {
      const int64_t rows = std::min(chunk, total - r0);
      const int64_t* map = cell_map.data_ptr<int64_t>() + r0;
      const Tensor l = logits.narrow(0, 0, rows);
      joint.tile<acc_t>(lat, map, rows, nullptr, act.narrow(0, 0, rows), l);
      launch_row_stats(l.data_ptr<acc_t>(), map, rows, joint.vocab, lat, blank, true, cells.out<acc_t>());
    }
    out = finish_forward<scalar_t>(lat, cells, enc.options(), save);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_joint_rnnt_loss_backward(
    const Tensor& grad_costs, const Tensor& enc, const Tensor& pred, const Tensor& weight,
    const c10::optional<Tensor>& bias, const Tensor& targets, const Tensor& logit_lengths,
    const Tensor& target_lengths, const Tensor& /*costs*/, const Tensor& alphas, const Tensor& betas,
    const Tensor& den, int64_t blank, c10::string_view activation, double clamp) {
  const c10::cuda::CUDAGuard guard(enc.device());
  const Lattice lat = lattice_of(enc.size(0), enc.size(1), pred.size(1), targets, logit_lengths, target_lengths);
  const Tensor scales = grad_costs.to(at::kDouble).contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, enc.scalar_type(), "fused_joint_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Joint joint(enc, pred, weight, bias, acc, activation);
    const Tensor alpha = alphas.to(acc).contiguous(), beta = betas.to(acc).contiguous(),
                 norm = den.to(acc).contiguous();
    const auto saved = saved_of<acc_t>(alpha, beta, norm, scales, blank, clamp, true);
    Tensor grad_enc = at::zeros_like(joint.enc), grad_pred = at::zeros_like(joint.pred);
    Tensor grad_weight = at::zeros_like(joint.weight), grad_bias = at::zeros({joint.vocab}, joint.enc.options());
    // Sequences with a non-finite cost get no gradient: their cells are skipped like dead ones.
    const Tensor finite = at::isfinite(beta.select(2, 0).select(1, 0)).contiguous();
    const bool* keep = finite.data_ptr<bool>();
    const Tensor cell_map = all_cells(lat, enc);
    const int64_t total = cell_map.numel();
    const int64_t chunk = chunk_rows(total, joint.vocab, joint.hidden, sizeof(acc_t));
    const Tensor act = at::empty({chunk, joint.hidden}, joint.enc.options());
    const Tensor logits = at::empty({chunk, joint.vocab}, joint.enc.options());
    const Tensor grad_act = at::empty({chunk, joint.hidden}, joint.enc.options());
    for (int64_t r0 = 0; r0 < total; r0 += chunk) {
      const int64_t rows = std::min(chunk, total - r0);
      const int64_t* map = cell_map.data_ptr<int64_t>() + r0;
      const Tensor a = act.narrow(0, 0, rows), grad_logits = logits.narrow(0, 0, rows);
      joint.tile<acc_t>(lat, map, rows, keep, a, grad_logits);  // logits, overwritten by their gradient
      acc_t* l = grad_logits.data_ptr<acc_t>();
      launch_gradient(static_cast<const acc_t*>(l), l, map, rows, joint.vocab, lat, saved);
      grad_weight.addmm_(grad_logits.t(), a);
      if (bias.has_value()) grad_bias += grad_logits.sum(0);
      Tensor g = grad_act.narrow(0, 0, rows);
      at::mm_out(g, grad_logits, joint.weight);
      joint_scatter_kernel<acc_t><<<blocks_for(rows, 16), kJointThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<acc_t>(), a.data_ptr<acc_t>(), map, rows, joint.hidden, lat, keep, joint.activation,
          grad_enc.data_ptr<acc_t>(), grad_pred.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const auto dtype = enc.scalar_type();
    out = {grad_enc.to(dtype), grad_pred.to(dtype), grad_weight.to(dtype),
           bias.has_value() ? grad_bias.to(dtype) : at::empty({0}, enc.options())};
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(amnets_native, CUDA, m) {
  m.impl("rnnt_loss_forward", &rnnt_loss_forward);
  m.impl("rnnt_loss_backward", &rnnt_loss_backward);
  m.impl("fused_joint_rnnt_loss_forward", &fused_joint_rnnt_loss_forward);
  m.impl("fused_joint_rnnt_loss_backward", &fused_joint_rnnt_loss_backward);
  m.impl("rnnt_device_labels", &rnnt_device_labels);
}

}  // namespace amnets::cuda
