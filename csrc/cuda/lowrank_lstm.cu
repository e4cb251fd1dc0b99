// CUDA face of lowrank_lstm_cell and lowrank_lstm_sequence. The contract is
// amnets_kernels/_ops/lowrank_lstm.py, the math and BPTT amnets_kernels/reference/lowrank_lstm.py, and the
// structure that of the CPU face (csrc/cpu/lowrank_lstm.cpp), which this file mirrors function for function:
// the input part of every gate for all T frames as two cuBLAS GEMMs up front (plus the bias), then only
// the recurrence steps; the activated gates and every c_t saved in the accumulation dtype; BPTT in reverse
// with the same two small products transposed, d(pre-activation) kept for all steps, and the factor and
// input gradients as large GEMMs at the end. fp16/bf16 are computed in fp32 with the state kept in fp32
// across steps; fp64 stays fp64. The cell is the sequence with T = 1.
//
// Two forward paths for the recurrence (the input projection and everything after the loop are shared):
//
//   step        per step: s = h V_hh^T and pre[t] += s U_hh^T by cuBLAS (at::mm_out, addmm_), then
//               step_forward_kernel (activations, state update, outputs): 3 launches per step. Any
//               size, any dtype, deterministic. Backward always runs this way (step_backward_kernel plus
//               two cuBLAS products per step).
//   persistent  persistent_forward_kernel: ONE cooperative launch runs all T steps. Block g owns the
//               hidden units J_g = [g J, g J + J) and keeps, in shared memory for the whole sequence, the
//               4 J rows of U_hh that feed those units (gates i, f, g, o) and the J columns of V_hh that
//               read them; its c and h live in registers of the thread that owns (b, j). A step is:
//                 1. read s_t = h_{t-1} V_hh^T (B x r_h, fp32) from a global buffer (L2, ld.global.cg);
//                 2. gates of the block's units = pre[t] + s_t U_hh^T (a block matrix-vector product out
//                    of shared memory; pre[t] was prefetched into registers during the previous barrier);
//                 3. activations, c_t, h_t of the block's units (the same device function as the step
//                    path); outputs written;
//                 4. the block's share of the next product, sum_{j in J_g} h_t[b, j] V_hh[:, j] (B x r_h),
//                    added into the next s buffer with fp32 atomics (red.global.add.v4.f32 on sm_90);
//                 5. one grid-wide barrier.
//               So one barrier per step and nothing but s (B x r_h floats) crosses blocks. The s buffer is
//               triple-buffered: at step t the blocks read S[t % 3], add into S[(t+1) % 3] and zero
//               S[(t+2) % 3]; every zero -> adds -> reads -> zero transition of one buffer is separated by
//               at least one barrier (see below). Used for float/half/bf16 when the plan fits (limits
//               below); fp64 always takes the step path.
//
// Path choice (host, per call): the environment variable AMNETS_LSTM_CUDA_PATH = auto (default) |
// persistent | step. auto takes the persistent kernel when the input is float/half/bf16, B <=
// kAutoMaxBatch, torch.use_deterministic_algorithms is off (the atomics are order-nondeterministic) and
// the plan fits; else the step path. `persistent` forces it (a TORCH_CHECK error says why when it does not
// fit; fp64 and an empty batch still step); `step` forces the step path. Tests on a GPU should run with
// both forced values.
//
// Grid barrier and its memory-ordering argument. The barrier counter is a 32-bit word zeroed (with the s
// buffers, one memset) on the stream before the launch; it only ever increases. Barrier n (n = 1, 2, ...;
// one after the initial s_0 and one after each step but the last) is:
//     __syncthreads();
//     thread 0: red.release.gpu.global.add.u32 [counter], 1;
//               spin: ld.acquire.gpu.global.u32 until value >= n * G;
//     __syncthreads();
//   (a) Within a block, bar.sync orders every thread's earlier memory operations (its red.adds into S,
//       its zero stores, its outputs) before thread 0's release in causality order; PTX release
//       operations are cumulative, so all of them are visible at gpu scope no later than the increment.
//   (b) The counter is modified only by atomic adds, so any value thread 0 of a waiting block reads is
//       in the release sequence of every earlier add; reading a value >= n G means its acquire load
//       synchronizes with all G releases of barrier n (with those of earlier barriers too). Hence every
//       write any block made before arriving happens-before whatever that thread 0 does next, and the
//       second bar.sync extends this to every thread of the waiting block.
//   (c) The S buffers are read with ld.global.cg (served by L2, the point of coherence) -- not needed by
//       the model after (b), but it keeps stale L1 lines out of the argument altogether.
//   (d) Per buffer the sequence is zero (step t-1) | adds (step t) | reads (step t+1) | zero (step t+2)
//       ..., where "|" is at least one barrier: adds never race the zeroing, reads see all G blocks'
//       adds, and the next zeroing never races a read. S[1], S[2] start zeroed by the memset, and the
//       initial s_0 = h0 V_hh^T is added into S[0] before barrier 1.
//   (e) Progress: cudaLaunchCooperativeKernel refuses a grid whose blocks cannot all be resident at once
//       (and the plan checks occupancy itself), so no spinning block can wait on a block that never runs;
//       a refused launch (cudaErrorCooperativeLaunchTooLarge) runs the step path instead, or is an error
//       when the persistent path is forced.
//       No reset, no sense reversal, no ABA: the counter reaches T G < 2^31 (checked).
//
// Limits of the persistent kernel (kPersistentThreads = 256 threads per block):
//   J (units per block) = max(kMinUnitsPerBlock = 4, ceil(H / #SMs)), G = ceil(H / J) blocks (<= #SMs);
//   B * J <= 256 (one thread per (b, j) pair);
//   shared memory 4 * (4 J R' + J Rp + B Rp + 5 B J) bytes <= the device's opt-in limit per block, with
//     Rp = round_up(r_h, 4), R' = round_up(Rp, 32) + 4 (padded U rows: conflict-free float4 reads when 1 or
//     >= 8 lanes share an output, 2-way conflicts for 2 or 4);
//   T * G < 2^31; float/half/bf16 only; auto also wants B <= 16 (above it cuBLAS steps are efficient).
//   On an H100 (132 SMs, 227 KB opt-in): H <= 1056 -> J = 8, G <= 132: B <= 32, r_h <= 1024 (B <= 16) or
//   776 (B = 32); H <= 2112 -> J = 16: B <= 16, r_h <= 576; H <= 4224 -> J = 32: B <= 8, r_h <= 320;
//   at most H = 256 * 132 (B = 1, tiny r_h). The target H = 1024, r_h = 128: 128 blocks (one per SM) of
//   21 KB (B = 1), 31 KB (B = 16) or 42 KB (B = 32) shared memory, 20.5 KB of it the factors.
//   On an A100 (108 SMs, 163 KB): H = 1024 -> J = 10, 103 blocks: B <= 25, r_h <= 608 (B <= 16).
//
// Other notes:
//   - --use_fast_math would turn tanhf into tanh.approx.f32 (relative error ~5e-4): the float tanh here
//     is written with __expf, like the CPU face's vector tanh; fp64 uses tanh().
//   - fp32 GEMMs follow torch.backends.cuda.matmul.allow_tf32 like every at::mm (off by default); the
//     persistent kernel's products are plain fp32 FMAs.
//   - The persistent path's atomic sums make the forward not bitwise reproducible run to run (rounding
//     of the r_h-sized sums only); the step path is as reproducible as cuBLAS.
//   - A persistent backward (the same scheme over dpre U_hh and ds V_hh) is not written yet: backward
//     launches 3 kernels per step.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include "../checks.h"
#include "../lowrank_lstm_cell.h"

namespace amnets::cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;            // the step kernels
constexpr int kPersistentThreads = 256;  // the persistent kernel (one thread per (b, j) pair at most)
constexpr int kMinUnitsPerBlock = 4;     // hidden units per persistent block, at least
constexpr int64_t kAutoMaxBatch = 16;    // auto takes the persistent kernel up to this batch
constexpr int kWarp = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Enough blocks to fill every SM (8 resident blocks of 256 threads each), no more: kernels grid-stride.
int64_t blocks_for(int64_t work_items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(ceil_div(work_items, kThreads), sms * 8));
}

// ---------------------------------------------------------------------------------------------------
// Launches: every kernel goes through one of these two, on the current stream, checked.

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, size_t smem, Args&&... args) {
  kernel<<<static_cast<unsigned>(blocks), threads, smem, at::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A cooperative launch: all blocks resident at once, or nothing launched (never a hang). Returns false,
// with the error cleared, when the device cannot hold the grid now (e.g. fewer SMs under MPS than the
// properties say); any other failure throws.
template <typename Params>
bool launch_cooperative(void (*kernel)(Params), int64_t blocks, int threads, size_t smem, Params params) {
  void* args[] = {&params};
  const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(blocks)),
                                                      dim3(unsigned(threads)), args, smem,
                                                      at::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Device math in the accumulation type. Under --use_fast_math __expf is ex2.approx (a few ulp); tanhf
// would become tanh.approx.f32 (~5e-4 relative), hence the exp form for float, as the CPU vector code.

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_acc(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}
__device__ __forceinline__ float tanh_acc(float x) { return 2.0f / (1.0f + __expf(-2.0f * x)) - 1.0f; }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// One hidden unit of one batch row: the four gate pre-activations and c_{t-1} -> activated gates, c_t, h_t.
template <typename acc_t>
struct Unit {
  acc_t i, f, g, o, c, h;
};

template <typename acc_t>
__device__ __forceinline__ Unit<acc_t> unit_forward(acc_t pi, acc_t pf, acc_t pg, acc_t po, acc_t c_prev) {
  Unit<acc_t> u;
  u.i = sigmoid_acc(pi), u.f = sigmoid_acc(pf), u.g = tanh_acc(pg), u.o = sigmoid_acc(po);
  u.c = u.f * c_prev + u.i * u.g;
  u.h = u.o * tanh_acc(u.c);
  return u;
}

// ---------------------------------------------------------------------------------------------------
// The step path: one thread per (b, j) element of the (B, H) state, grid-stride. Element counts are
// below 2^31 (checked), so the split uses 32-bit division (64-bit division is a subroutine call).

// pre (B, 4H): pre-activations in, activated gates out (the CPU face's step_forward over one step).
// c (B, H) updated in place; h (B, H) the state in the accumulation type for the next GEMM; out (B, H)
// h in the input dtype; cells (B, H) c_t, or nullptr without save.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    step_forward_kernel(acc_t* pre, acc_t* c, acc_t* h, scalar_t* out, acc_t* cells, int64_t n, int hidden) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t b = uint32_t(e) / uint32_t(hidden), j = uint32_t(e) - b * uint32_t(hidden);
    acc_t* p = pre + int64_t(b) * 4 * hidden + j;
    const Unit<acc_t> u = unit_forward(p[0], p[hidden], p[2 * hidden], p[3 * hidden], c[e]);
    p[0] = u.i, p[hidden] = u.f, p[2 * hidden] = u.g, p[3 * hidden] = u.o;
    c[e] = u.c;
    h[e] = u.h;
    out[e] = static_cast<scalar_t>(u.h);
    if (cells != nullptr) cells[e] = u.c;
  }
}

// Backward of one step (the CPU face's step_backward): dL/dh = dh + grad_out (grad_out read in the input
// dtype; dh is not written: the next GEMM overwrites it), dc updated in place to dL/dc_{t-1}, dpre (B, 4H).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    step_backward_kernel(const acc_t* gates, const acc_t* c_t, const acc_t* c_prev, const scalar_t* grad_out,
                         const acc_t* dh, acc_t* dc, acc_t* dpre, int64_t n, int hidden) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t b = uint32_t(e) / uint32_t(hidden), j = uint32_t(e) - b * uint32_t(hidden);
    const int64_t row = int64_t(b) * 4 * hidden + j;
    const acc_t i = gates[row], f = gates[row + hidden], g = gates[row + 2 * hidden], o = gates[row + 3 * hidden];
    const acc_t tc = tanh_acc(c_t[e]);
    const acc_t dhe = dh[e] + static_cast<acc_t>(grad_out[e]);
    const acc_t d = dc[e] + dhe * o * (acc_t(1) - tc * tc);
    dpre[row] = d * g * i * (acc_t(1) - i);
    dpre[row + hidden] = d * c_prev[e] * f * (acc_t(1) - f);
    dpre[row + 2 * hidden] = d * i * (acc_t(1) - g * g);
    dpre[row + 3 * hidden] = dhe * tc * o * (acc_t(1) - o);
    dc[e] = d * f;
  }
}

// ---------------------------------------------------------------------------------------------------
// The persistent path (float accumulation only).

// Shared-memory layout of one block, in floats; the host sizes the launch with the same function.
struct SmemLayout {
  int64_t u, v, s, gate, h, total;  // offsets of U rows (4J x row_stride), V columns (J x Rp), s (B x Rp),
                                    // gate products (B x 4J), h (B x J); total floats
  __host__ __device__ SmemLayout(int units, int rank_pad, int row_stride, int batch) {
    u = 0;
    v = u + int64_t(4) * units * row_stride;
    s = v + int64_t(units) * rank_pad;
    gate = s + int64_t(batch) * rank_pad;
    h = gate + int64_t(batch) * 4 * units;
    total = h + int64_t(batch) * units;
  }
};

template <typename scalar_t>
struct PersistentArgs {
  float* pre;               // (T, B, 4H): input part of the gates + bias; activated gates written back if save
  const scalar_t* w_hh_u;   // (4H, R)
  const scalar_t* w_hh_v;   // (R, H)
  const scalar_t* h0;       // (B, H)
  const scalar_t* c0;       // (B, H)
  scalar_t* out;            // (T, B, H)
  scalar_t* h_n;            // (B, H)
  scalar_t* c_n;            // (B, H)
  float* cells;             // (T, B, H) c_t, or nullptr without save
  float* s;                 // (3, B, Rp) zeroed: the triple-buffered h V_hh^T
  unsigned* arrivals;       // zeroed barrier counter
  int save;                 // write the activated gates over pre
  int steps, batch, hidden, rank, rank_pad, row_stride, units;
};

// Grid-wide barrier number n (see the header for the ordering argument).
__device__ __forceinline__ void grid_barrier(unsigned* arrivals, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(arrivals) : "memory");
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(arrivals) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

// dst[0..3] += v, as one vector atomic where the chip has it.
__device__ __forceinline__ void atomic_add4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
  atomicAdd(dst, v.x), atomicAdd(dst + 1, v.y), atomicAdd(dst + 2, v.z), atomicAdd(dst + 3, v.w);
#endif
}

// The block's share of s = h V_hh^T: for each (b, 4 consecutive k), sum over its nj units, added into dst
// (B x Rp). Units past nj hold no h (the last block may own fewer than J).
__device__ __forceinline__ void add_partial_product(const float* vs, const float* hs, float* dst, int batch,
                                                    int units, int nj, int rank_pad) {
  const int chunks = rank_pad / 4;
  const float4* v4 = reinterpret_cast<const float4*>(vs);
  for (int o = threadIdx.x; o < batch * chunks; o += kPersistentThreads) {
    const int b = o / chunks, c = o - b * chunks;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < nj; ++j) {
      const float hv = hs[b * units + j];
      const float4 v = v4[j * chunks + c];
      acc.x += hv * v.x, acc.y += hv * v.y, acc.z += hv * v.z, acc.w += hv * v.w;
    }
    atomic_add4(dst + int64_t(b) * rank_pad + 4 * c, acc);
  }
}

// gate[b][r] = sum_k us[r][k] s[b][k] for the block's 4J rows r = q J + j: each output is a group of P
// consecutive lanes (P a power of two <= 32) striding over the float4 chunks of k, then a shuffle sum.
// The pass count is the same for every thread, so the shuffles always see full warps.
__device__ __forceinline__ void gate_products(const float* us, const float* ss, float* gate, int batch, int units,
                                              int rank_pad, int row_stride) {
  const int rows = 4 * units, outputs = batch * rows, chunks = rank_pad / 4, stride4 = row_stride / 4;
  int group = 1;
  while (group < kWarp && outputs * group * 2 <= kPersistentThreads && group < chunks) group *= 2;
  const int lane = threadIdx.x % group, per_pass = kPersistentThreads / group;
  const float4* u4 = reinterpret_cast<const float4*>(us);
  const float4* s4 = reinterpret_cast<const float4*>(ss);
  for (int base = 0; base < outputs; base += per_pass) {
    const int o = base + int(threadIdx.x) / group;
    float acc = 0.f;
    if (o < outputs) {
      const int b = o / rows, r = o - b * rows;
      const float4* u = u4 + r * stride4;
      const float4* s = s4 + b * chunks;
#pragma unroll 4
      for (int c = lane; c < chunks; c += group) {
        const float4 x = u[c], y = s[c];
        acc += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
      }
    }
    for (int offset = group / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (o < outputs && lane == 0) gate[o] = acc;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kPersistentThreads, 1) persistent_forward_kernel(const PersistentArgs<scalar_t> a) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int units = a.units, rank = a.rank, rank_pad = a.rank_pad, row_stride = a.row_stride;
  const int batch = a.batch, hidden = a.hidden, tid = threadIdx.x;
  const SmemLayout layout(units, rank_pad, row_stride, batch);
  float *us = smem + layout.u, *vs = smem + layout.v, *ss = smem + layout.s, *gate = smem + layout.gate,
        *hs = smem + layout.h;
  const int j0 = blockIdx.x * units, nj = min(units, hidden - j0);
  const int64_t buffer = int64_t(batch) * rank_pad;  // floats per s buffer

  // The block's factors, zero-padded: us[q J + j][k] = U[q H + j0 + j][k], vs[j][k] = V[k][j0 + j].
  for (int e = tid; e < 4 * units * rank_pad; e += kPersistentThreads) {
    const int r = e / rank_pad, k = e - r * rank_pad, q = r / units, j = r - q * units;
    us[r * row_stride + k] =
        j < nj && k < rank ? static_cast<float>(a.w_hh_u[int64_t(q * hidden + j0 + j) * rank + k]) : 0.f;
  }
  for (int e = tid; e < rank_pad * units; e += kPersistentThreads) {
    const int k = e / units, j = e - k * units;
    vs[j * rank_pad + k] = j < nj && k < rank ? static_cast<float>(a.w_hh_v[int64_t(k) * hidden + j0 + j]) : 0.f;
  }

  // This thread's (b, j) pair, if any: its c and h stay in registers, its input gates are prefetched.
  const bool owner = tid < batch * nj;
  const int pb = owner ? tid / nj : 0, pj = owner ? tid - pb * nj : 0;
  const int64_t state = int64_t(pb) * hidden + j0 + pj;  // index in (B, H)
  float c = 0.f, h = 0.f, px[4];
  auto prefetch = [&](int t) {
    const float* p = a.pre + (int64_t(t) * batch + pb) * 4 * hidden + j0 + pj;
#pragma unroll
    for (int q = 0; q < 4; ++q) px[q] = p[int64_t(q) * hidden];
  };
  if (owner) {
    c = static_cast<float>(a.c0[state]);
    h = static_cast<float>(a.h0[state]);
    hs[pb * units + pj] = h;
    prefetch(0);
  }
  __syncthreads();
  add_partial_product(vs, hs, a.s, batch, units, nj, rank_pad);  // s_0 = h0 V^T into S[0]
  grid_barrier(a.arrivals, gridDim.x);

  for (int t = 0; t < a.steps; ++t) {
    // 1. s_t from S[t % 3], through L2.
    const float4* src = reinterpret_cast<const float4*>(a.s + (t % 3) * buffer);
    for (int e = tid; e < batch * rank_pad / 4; e += kPersistentThreads) {
      reinterpret_cast<float4*>(ss)[e] = __ldcg(src + e);
    }
    __syncthreads();
    // 2. The recurrent part of the block's gates.
    gate_products(us, ss, gate, batch, units, rank_pad, row_stride);
    __syncthreads();
    // 3. Activations and state update of the owned pair; outputs.
    if (owner) {
      const float* g = gate + pb * 4 * units + pj;
      const Unit<float> u = unit_forward(px[0] + g[0], px[1] + g[units], px[2] + g[2 * units], px[3] + g[3 * units], c);
      c = u.c, h = u.h;
      hs[pb * units + pj] = h;
      const int64_t at_t = int64_t(t) * batch * hidden + state;
      a.out[at_t] = static_cast<scalar_t>(h);
      if (a.save) {
        float* p = a.pre + (int64_t(t) * batch + pb) * 4 * hidden + j0 + pj;
        p[0] = u.i, p[hidden] = u.f, p[2 * hidden] = u.g, p[3 * hidden] = u.o;
      }
      if (a.cells != nullptr) a.cells[at_t] = c;
      if (t + 1 < a.steps) prefetch(t + 1);
    }
    if (t + 1 == a.steps) break;
    // 4. Zero S[(t+2) % 3] (last read at step t-1), add this block's share of s_{t+1} into S[(t+1) % 3].
    float* zero = a.s + ((t + 2) % 3) * buffer;
    for (int64_t e = int64_t(blockIdx.x) * kPersistentThreads + tid; e < buffer;
         e += int64_t(gridDim.x) * kPersistentThreads) {
      __stcg(zero + e, 0.f);
    }
    __syncthreads();
    add_partial_product(vs, hs, a.s + ((t + 1) % 3) * buffer, batch, units, nj, rank_pad);
    // 5. Everyone's share is in before anyone reads it.
    grid_barrier(a.arrivals, unsigned(t + 2) * gridDim.x);
  }
  if (owner) {
    a.h_n[state] = static_cast<scalar_t>(h);
    a.c_n[state] = static_cast<scalar_t>(c);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host: path choice.

// How the persistent kernel would run this problem, or why it cannot.
struct Plan {
  bool fits = false;
  std::string why;
  int units = 0, blocks = 0, rank_pad = 0, row_stride = 0;
  size_t smem = 0;
};

template <typename scalar_t>
Plan plan_persistent(int64_t steps, int64_t batch, int64_t hidden, int64_t rank) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  Plan p;
  const int64_t sms = prop->multiProcessorCount;
  const int64_t units = std::max<int64_t>(kMinUnitsPerBlock, ceil_div(hidden, sms));
  const int64_t blocks = ceil_div(hidden, units);
  p.units = int(std::min<int64_t>(units, std::numeric_limits<int>::max()));
  p.blocks = int(std::min<int64_t>(blocks, std::numeric_limits<int>::max()));
  p.rank_pad = int(round_up(rank, 4));
  p.row_stride = int(round_up(p.rank_pad, 32) + 4);
  p.smem = size_t(SmemLayout(p.units, p.rank_pad, p.row_stride, int(batch)).total) * sizeof(float);
  if (!prop->cooperativeLaunch) {
    p.why = "the device does not support cooperative launches";
  } else if (batch * units > kPersistentThreads) {
    p.why = "B * units per block = " + std::to_string(batch) + " * " + std::to_string(units) + " > " +
            std::to_string(kPersistentThreads);
  } else if (p.smem > prop->sharedMemPerBlockOptin) {
    p.why = "it needs " + std::to_string(p.smem) + " B of shared memory per block, over the device's " +
            std::to_string(prop->sharedMemPerBlockOptin);
  } else if (steps * blocks >= std::numeric_limits<int32_t>::max()) {
    p.why = "T * blocks must stay below 2^31 (barrier counter)";
  } else {
    auto* kernel = persistent_forward_kernel<scalar_t>;
    if (p.smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.smem)));
    }
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, p.smem));
    if (int64_t(per_sm) * sms < blocks) {
      p.why = std::to_string(blocks) + " blocks cannot all be resident (" + std::to_string(per_sm) + " per SM)";
    } else {
      p.fits = true;
    }
  }
  return p;
}

enum class Path { kStep, kPersistent };

// AMNETS_LSTM_CUDA_PATH: auto (default), persistent, step.
std::string path_setting() {
  const char* env = std::getenv("AMNETS_LSTM_CUDA_PATH");
  const std::string value = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK(value == "auto" || value == "persistent" || value == "step",
              "lowrank_lstm (cuda): AMNETS_LSTM_CUDA_PATH must be auto, persistent or step; got '", value, "'");
  return value;
}

template <typename scalar_t>
Path choose_path(int64_t steps, int64_t batch, int64_t hidden, int64_t rank, Plan& plan) {
  const std::string setting = path_setting();
  if (setting == "step" || batch == 0) return Path::kStep;
  plan = plan_persistent<scalar_t>(steps, batch, hidden, rank);
  if (setting == "persistent") {
    TORCH_CHECK(plan.fits, "lowrank_lstm (cuda): AMNETS_LSTM_CUDA_PATH=persistent, but the persistent kernel "
                "cannot run T = ", steps, ", B = ", batch, ", H = ", hidden, ", r_h = ", rank, ": ", plan.why);
    return Path::kPersistent;
  }
  const bool fast = plan.fits && batch <= kAutoMaxBatch && !at::globalContext().deterministicAlgorithms();
  return fast ? Path::kPersistent : Path::kStep;
}

// ---------------------------------------------------------------------------------------------------
// Host: the recurrence, shared by the cell (T = 1) and the sequence.

at::ScalarType acc_of(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// pre (T, B, 4H) = x V_ih^T U_ih^T + bias, all frames at once, in the accumulation dtype.
Tensor input_projection(const Tensor& x, const Tensor& w_ih_u, const Tensor& w_ih_v, const c10::optional<Tensor>& bias) {
  const Tensor rows = x.reshape({-1, x.size(-1)});
  const Tensor s = at::mm(rows, w_ih_v.t());
  Tensor pre = bias.has_value() ? at::addmm(bias->to(rows.scalar_type()), s, w_ih_u.t()) : at::mm(s, w_ih_u.t());
  return pre.view({x.size(0), x.size(1), -1}).contiguous();
}

struct Recurrence {  // what both paths produce
  Tensor out, h_n, c_n, cells;
};

// The step path: pre (T, B, 4H) becomes the activated gates.
template <typename scalar_t, typename acc_t>
Recurrence recur_steps(Tensor& pre, const Tensor& h0, const Tensor& c0, const Tensor& w_hh_u, const Tensor& w_hh_v,
                       bool save) {
  const auto acc = pre.scalar_type();
  const int64_t steps = pre.size(0), batch = pre.size(1), hidden = w_hh_v.size(1), n = batch * hidden;
  const Tensor u = w_hh_u.to(acc).contiguous(), v = w_hh_v.to(acc).contiguous();
  Tensor h = h0.to(acc, false, true).contiguous(), c = c0.to(acc, false, true).contiguous();
  Recurrence r;
  r.out = at::empty({steps, batch, hidden}, h0.options());
  r.cells = save ? at::empty({steps, batch, hidden}, pre.options()) : Tensor();
  Tensor s = at::empty({batch, v.size(0)}, pre.options());  // h V_hh^T, reused every step
  for (int64_t t = 0; t < steps; ++t) {
    Tensor gates = pre[t];
    at::mm_out(s, h, v.t());
    gates.addmm_(s, u.t());
    if (n > 0) {
      launch(step_forward_kernel<scalar_t, acc_t>, blocks_for(n), kThreads, 0, gates.data_ptr<acc_t>(),
             c.data_ptr<acc_t>(), h.data_ptr<acc_t>(), r.out.data_ptr<scalar_t>() + t * n,
             save ? r.cells.data_ptr<acc_t>() + t * n : static_cast<acc_t*>(nullptr), n, int(hidden));
    }
  }
  r.h_n = h.to(h0.scalar_type());
  r.c_n = c.to(c0.scalar_type());
  return r;
}

// The persistent path (float accumulation): pre (T, B, 4H) becomes the activated gates when save.
// Returns false, having launched nothing and changed nothing, when the device refuses the grid.
template <typename scalar_t>
bool recur_persistent(Recurrence& result, Tensor& pre, const Tensor& h0, const Tensor& c0, const Tensor& w_hh_u,
                      const Tensor& w_hh_v, bool save, const Plan& plan) {
  const int64_t steps = pre.size(0), batch = pre.size(1), hidden = w_hh_v.size(1), rank = w_hh_v.size(0);
  Recurrence r;
  r.out = at::empty({steps, batch, hidden}, h0.options());
  r.h_n = at::empty({batch, hidden}, h0.options());
  r.c_n = at::empty({batch, hidden}, c0.options());
  r.cells = save ? at::empty({steps, batch, hidden}, pre.options()) : Tensor();
  const int64_t buffer = batch * plan.rank_pad;
  // Three s buffers and the barrier counter, zeroed by one memset on the stream.
  Tensor work = at::zeros({3 * buffer + 4}, pre.options());
  const Tensor u = w_hh_u.contiguous(), v = w_hh_v.contiguous(), h = h0.contiguous(), c = c0.contiguous();
  PersistentArgs<scalar_t> args;
  args.pre = pre.data_ptr<float>();
  args.w_hh_u = u.data_ptr<scalar_t>();
  args.w_hh_v = v.data_ptr<scalar_t>();
  args.h0 = h.data_ptr<scalar_t>();
  args.c0 = c.data_ptr<scalar_t>();
  args.out = r.out.data_ptr<scalar_t>();
  args.h_n = r.h_n.data_ptr<scalar_t>();
  args.c_n = r.c_n.data_ptr<scalar_t>();
  args.cells = save ? r.cells.data_ptr<float>() : nullptr;
  args.s = work.data_ptr<float>();
  args.arrivals = reinterpret_cast<unsigned*>(work.data_ptr<float>() + 3 * buffer);
  args.save = save;
  args.steps = int(steps), args.batch = int(batch), args.hidden = int(hidden), args.rank = int(rank);
  args.rank_pad = plan.rank_pad, args.row_stride = plan.row_stride, args.units = plan.units;
  if (!launch_cooperative(persistent_forward_kernel<scalar_t>, plan.blocks, kPersistentThreads, plan.smem, args)) {
    return false;
  }
  result = r;
  return true;
}

// BPTT. Returns dpre (T, B, 4H); dh, dc (B, H) enter as dL/dh_T, dL/dc_T and leave as dL/dh_0, dL/dc_0.
template <typename scalar_t, typename acc_t>
Tensor backprop(const Tensor& grad_out, Tensor& dh, Tensor& dc, const Tensor& gates, const Tensor& cells,
                const Tensor& c0, const Tensor& w_hh_u, const Tensor& w_hh_v) {
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = w_hh_v.size(1), n = batch * hidden;
  Tensor dpre = at::empty_like(gates);
  Tensor ds = at::empty({batch, w_hh_u.size(1)}, dh.options());  // dpre U_hh, reused every step
  for (int64_t t = steps - 1; t >= 0; --t) {
    if (n > 0) {
      const acc_t* cprev = t > 0 ? cells.data_ptr<acc_t>() + (t - 1) * n : c0.data_ptr<acc_t>();
      launch(step_backward_kernel<scalar_t, acc_t>, blocks_for(n), kThreads, 0,
             gates.data_ptr<acc_t>() + t * 4 * n, cells.data_ptr<acc_t>() + t * n, cprev,
             grad_out.data_ptr<scalar_t>() + t * n, static_cast<const acc_t*>(dh.data_ptr<acc_t>()),
             dc.data_ptr<acc_t>(), dpre.data_ptr<acc_t>() + t * 4 * n, n, int(hidden));
    }
    at::mm_out(ds, dpre[t], w_hh_u);
    at::mm_out(dh, ds, w_hh_v);  // dL/dh_{t-1} through the recurrent product
  }
  return dpre;
}

// For pre += (inp V^T) U^T over rows: d inp = (dpre U) V, dU = dpre^T (inp V^T), dV = (dpre U)^T inp.
// d inp only when wanted (the recurrent one was propagated step by step already).
std::tuple<Tensor, Tensor, Tensor> factor_grads(const Tensor& dpre, const Tensor& inp, const Tensor& u,
                                                const Tensor& v, bool want_input) {
  const Tensor ds = at::mm(dpre, u);
  return {want_input ? at::mm(ds, v) : Tensor(), at::mm(dpre.t(), at::mm(inp, v.t())), at::mm(ds.t(), inp)};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------------------------------------------
// The ops

void check_sizes(int64_t batch, int64_t hidden) {
  TORCH_CHECK(batch * hidden < std::numeric_limits<int32_t>::max() && 4 * hidden < std::numeric_limits<int32_t>::max(),
              "lowrank_lstm (cuda): B * H must stay below 2^31; got B = ", batch, ", H = ", hidden);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowrank_lstm_sequence_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih_u, const Tensor& w_ih_v,
    const Tensor& w_hh_u, const Tensor& w_hh_v, const c10::optional<Tensor>& bias, bool save) {
  checks::lowrank_lstm("lowrank_lstm_sequence_forward", x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, true);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_of(x);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh_v.size(1), rank = w_hh_v.size(0);
  check_sizes(batch, hidden);
  Tensor pre = input_projection(x.to(acc), w_ih_u.to(acc), w_ih_v.to(acc), bias);  // becomes the gates
  Recurrence r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_lstm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      Plan plan;
      if (choose_path<scalar_t>(steps, batch, hidden, rank, plan) == Path::kPersistent) {
        if (recur_persistent<scalar_t>(r, pre, h0, c0, w_hh_u, w_hh_v, save, plan)) return;
        TORCH_CHECK(path_setting() != "persistent", "lowrank_lstm (cuda): AMNETS_LSTM_CUDA_PATH=persistent, but "
                    "the device refused the cooperative launch of ", plan.blocks, " blocks (too large to be resident)");
      }
    }
    r = recur_steps<scalar_t, acc_t>(pre, h0, c0, w_hh_u, w_hh_v, save);
  });
  const auto none = at::empty({0}, pre.options());
  return {r.out, r.h_n, r.c_n, save ? pre : none, save ? r.cells : none.clone()};
}

Grads lowrank_lstm_sequence_backward(const Tensor& grad_out, const Tensor& grad_h_n, const Tensor& grad_c_n,
                                     const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih_u,
                                     const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                     const Tensor& out, const Tensor& gates, const Tensor& cells) {
  checks::lowrank_lstm_backward("lowrank_lstm_sequence_backward", grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u,
                                w_ih_v, w_hh_u, w_hh_v, out, gates, cells);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_of(x);
  const auto dtype = x.scalar_type();
  check_sizes(x.size(1), w_hh_v.size(1));
  const Tensor iu = w_ih_u.to(acc).contiguous(), iv = w_ih_v.to(acc).contiguous();
  const Tensor hu = w_hh_u.to(acc).contiguous(), hv = w_hh_v.to(acc).contiguous();
  Tensor dh = grad_h_n.to(acc, false, true).contiguous(), dc = grad_c_n.to(acc, false, true).contiguous();
  const Tensor c0a = c0.to(acc).contiguous(), ga = gates.to(acc).contiguous(), ca = cells.to(acc).contiguous();
  const Tensor go = grad_out.to(dtype).contiguous();  // read in the input dtype by the step kernel
  Tensor dpre;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_lstm_backward_cuda", [&] {
    dpre = backprop<scalar_t, at::opmath_type<scalar_t>>(go, dh, dc, ga, ca, c0a, hu, hv);
  });
  // Everything after the time loop, in the schema's order: (dx, dh0, dc0, dU_ih, dV_ih, dU_hh, dV_hh, dbias).
  const Tensor h_prev = at::cat({h0.to(acc).unsqueeze(0), out.to(acc).slice(0, 0, x.size(0) - 1)});
  const Tensor rows = dpre.reshape({-1, dpre.size(-1)});
  auto [dx, d_ih_u, d_ih_v] = factor_grads(rows, x.to(acc).reshape({-1, x.size(-1)}), iu, iv, true);
  auto [unused, d_hh_u, d_hh_v] = factor_grads(rows, h_prev.reshape({-1, h_prev.size(-1)}), hu, hv, false);
  (void)unused;
  return {dx.view(x.sizes()).to(dtype), dh.to(dtype),     dc.to(dtype),     d_ih_u.to(dtype),
          d_ih_v.to(dtype),             d_hh_u.to(dtype), d_hh_v.to(dtype), rows.sum(0).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(amnets_native, CUDA, m) {
  m.impl("lowrank_lstm_cell_forward", &amnets::lowrank_lstm_cell_forward<lowrank_lstm_sequence_forward>);
  m.impl("lowrank_lstm_cell_backward", &amnets::lowrank_lstm_cell_backward<lowrank_lstm_sequence_backward>);
  m.impl("lowrank_lstm_sequence_forward", &lowrank_lstm_sequence_forward);
  m.impl("lowrank_lstm_sequence_backward", &lowrank_lstm_sequence_backward);
}

}  // namespace amnets::cuda
