// CPU face of lowrank_lstm_cell and lowrank_lstm_sequence (contract: amnets_kernels/_ops/lowrank_lstm.py;
// math and BPTT: amnets_kernels/reference/lowrank_lstm.py).
//
// Sequence forward: the input part of every gate for all T frames comes first, as two large GEMMs
// ((T B, D) x (D, r) x (r, 4H), plus the bias); the time loop then does only what depends on h: the
// recurrent low-rank product s = h V_hh^T, gates += s U_hh^T (two small products into preallocated
// buffers, struct Recurrent), and one pass for the activations and the state update. No allocation inside
// the loop. With save, the activated gates and every c_t are written once for backward.
// Backward walks the steps in reverse with the same two small products (transposed) and a pointwise pass,
// keeps d(pre-activation) for all steps, and forms the factor and input gradients at the end as large GEMMs.
// fp16/bf16 inputs are computed in fp32 (the state stays fp32 across steps), except a bf16 forward on a CPU
// with AVX512-BF16 where the row kernels take the batch (dpbf16_forward): there the factors stay bf16, the
// input projection is ATen's bf16 GEMM and the recurrent products run on vdpbf16ps with h and s rounded to
// bf16 on the way in (fp32 sums, fp32 state), as torch's bf16 nn.LSTM rounds its h; and the bf16 backward's
// closing GEMMs (factor and input gradients) run in bf16 on such a CPU. Without these a bf16 model ran at the
// fp32 speed while stock bf16 nn.LSTM ran 2.2-2.4x faster than its fp32 self.
// For float and up to 64 batch rows the time loops make no BLAS call: the small products are our row
// kernels (kernels.h); with them the forward at H=1024 r=256 T=100 on 2 threads took 52.7 / 192 ms at
// B=16 / 64, against 74.7 / 307 ms with MKL's GEMM per step (benchmarks/results/
// amd-epyc-2-threads-lstm-headline.md, 2026-11-30, and its 2026-11-26 version). Their threads are OpenMP's
// (OpenMpScope), not our pool's: the GEMMs before and after the loop are OpenMP regions whose idle threads
// spin for milliseconds, and the pool's dynamic claiming loses the L2 affinity of OpenMP's static split
// (2 threads, H=1024 r=256 T=100, forward: 9.4 / 62 ms at B=1 / 16 on the pool, 6.4 / 52 ms on OpenMP).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../lowrank_lstm_cell.h"
#include "bf16_convert.h"
#include "fresh_pages.h"
#include "kernels.h"
#include "lstm_pointwise.h"
#include "lstm_stack.h"
#include "parallel.h"
#include "simd.h"

namespace amnets::cpu {
namespace {

using at::Tensor;
namespace simd = amnets::simd;

// ---------------------------------------------------------------------------------------------------
// Pointwise backward of one step (the forward pass is in lstm_pointwise.h), rows of 4H gates [i | f | g | o].

// Backward of one step for one batch row: from dL/dh and dL/dc (dc updated in place to dL/dc_prev)
// and the saved gates, c_t and c_{t-1}, the gradient of the 4H pre-activations.
template <typename acc_t>
AMNETS_INLINE void step_backward_scalar(const acc_t* gates, const acc_t* c_t, const acc_t* c_prev, const acc_t* dh,
                                        acc_t* dc, acc_t* dpre, int64_t k, int64_t hidden) {
  const acc_t i = gates[k], f = gates[hidden + k], g = gates[2 * hidden + k], o = gates[3 * hidden + k];
  const acc_t tc = std::tanh(c_t[k]);
  const acc_t d = dc[k] + dh[k] * o * (1 - tc * tc);
  dpre[k] = d * g * i * (1 - i);
  dpre[hidden + k] = d * c_prev[k] * f * (1 - f);
  dpre[2 * hidden + k] = d * i * (1 - g * g);
  dpre[3 * hidden + k] = dh[k] * tc * o * (1 - o);
  dc[k] = d * f;
}

AMNETS_CLONES void step_backward(const float* gates, const float* c_t, const float* c_prev, const float* dh,
                                 float* dc, float* dpre, int64_t n, int64_t hidden) {
  int64_t k = 0;
  for (; k + simd::kWidth <= n; k += simd::kWidth) {
    const simd::vfloat i = simd::load(gates + k), f = simd::load(gates + hidden + k);
    const simd::vfloat g = simd::load(gates + 2 * hidden + k), o = simd::load(gates + 3 * hidden + k);
    const simd::vfloat tc = tanh_(simd::load(c_t + k)), vdh = simd::load(dh + k);
    const simd::vfloat d = simd::load(dc + k) + vdh * o * (1.0f - tc * tc);
    simd::store(dpre + k, d * g * i * (1.0f - i));
    simd::store(dpre + hidden + k, d * simd::load(c_prev + k) * f * (1.0f - f));
    simd::store(dpre + 2 * hidden + k, d * i * (1.0f - g * g));
    simd::store(dpre + 3 * hidden + k, vdh * tc * o * (1.0f - o));
    simd::store(dc + k, d * f);
  }
  for (; k < n; ++k) step_backward_scalar(gates, c_t, c_prev, dh, dc, dpre, k, hidden);
}

void step_backward(const double* gates, const double* c_t, const double* c_prev, const double* dh, double* dc,
                   double* dpre, int64_t n, int64_t hidden) {
  for (int64_t k = 0; k < n; ++k) step_backward_scalar(gates, c_t, c_prev, dh, dc, dpre, k, hidden);
}

// ---------------------------------------------------------------------------------------------------
// The recurrence, shared by the cell (T = 1) and the sequence.

struct Factors {  // every weight in the accumulation dtype, contiguous
  Tensor w_ih_u, w_ih_v, w_hh_u, w_hh_v;
  int64_t hidden() const { return w_hh_v.size(1); }
};

Factors factors_of(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d, at::ScalarType acc) {
  return {a.to(acc).contiguous(), b.to(acc).contiguous(), c.to(acc).contiguous(), d.to(acc).contiguous()};
}

at::ScalarType acc_of(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Up to this many batch rows a float step's recurrent products run on our row kernels (kernels.h): no BLAS
// call per step. Beyond it, ATen's GEMM.
constexpr int64_t kRowKernelsMax = 64;
// The forward packs V_hh^T and U_hh^T once per call (~1.5 ms at H=1024 r=256 on one AMD EPYC core): with
// fewer steps than this, ATen's GEMM per step is as fast or faster on 2 threads (B=5 / 16, H=1024 r=256:
// T=1 1.1 / 1.9 ms against 2.7 / 3.2 packed, T=4 even, T=8 packed 12-17% faster; ad-hoc runs, 2026-11-30).
constexpr int64_t kPackMinSteps = 4;

// A forward that keeps bf16 factors in bf16 (see the top of the file): bf16 input and factors, a CPU with
// vdpbf16ps, and a batch the row kernels take (the bf16 twins exist for them alone).
bool dpbf16_forward(const Tensor& x, const Tensor& w_ih_u, const Tensor& w_ih_v, const Tensor& w_hh_u,
                    const Tensor& w_hh_v) {
  const int64_t steps = x.size(0), batch = x.size(1);
  bool yes = simd::has_dpbf16() && batch <= kRowKernelsMax && (batch <= kMaxDotBatch || steps >= kPackMinSteps);
  for (const Tensor* t : {&x, &w_ih_u, &w_ih_v, &w_hh_u, &w_hh_v}) yes = yes && t->scalar_type() == at::kBFloat16;
  return yes;
}

// pre (T, B, 4H) = x V_ih^T U_ih^T + bias, all frames at once.
Tensor input_projection(const Tensor& x, const Factors& w, const c10::optional<Tensor>& bias) {
  const Tensor rows = x.reshape({-1, x.size(-1)});
  const Tensor s = at::mm(rows, w.w_ih_v.t());
  Tensor pre = bias.has_value() ? at::addmm(bias->to(rows.scalar_type()), s, w.w_ih_u.t()) : at::mm(s, w.w_ih_u.t());
  return pre.view({x.size(0), x.size(1), w.w_ih_u.size(0)});  // not -1: B may be 0
}

// The recurrent products of one step for B rows: gates (B, 4H) += (h V_hh^T) U_hh^T forward, and
// dh (B, H) = (dpre U_hh) V_hh backward. Float or bf16 forward, one row (or up to kMaxDotBatch rows for fewer
// than kPackMinSteps steps): row dots over the factors as they are. Otherwise float or bf16 up to
// kRowKernelsMax rows (forward: with kPackMinSteps steps or more): axpys (expand; bf16 on pair panels); the
// forward packs V_hh^T and U_hh^T once per call into this thread's buffers (a fresh multi-MB allocation per
// call costs its page faults, ~2 ms at H=1024 r=256, more than a step), the backward reads U_hh and V_hh as
// they are (their rows are short). Otherwise (double, more rows, short sequences): ATen's GEMM.
struct Recurrent {
  const Factors& w;
  int64_t batch;
  bool bf16 = false, dots = false, rows = false;  // bf16: the factors are (dpbf16_forward), forward only
  Panels vt{nullptr, 0, 0}, ut{nullptr, 0, 0};  // V_hh^T (H, r), U_hh^T (r, 4H): forward with `rows`
  PairPanels vtp{nullptr, 0, 0}, utp{nullptr, 0, 0};  // the same for bf16 factors
  Panels ub{nullptr, 0, 0}, vb{nullptr, 0, 0};  // U_hh, V_hh as panels: backward with `rows`

  Recurrent(const Factors& w_, int64_t batch_, bool forward, int64_t steps) : w(w_), batch(batch_) {
    bf16 = w.w_hh_u.scalar_type() == at::kBFloat16;
    const bool rowwise = bf16 || w.w_hh_u.scalar_type() == at::kFloat;
    // Where the forward may pack (kPackMinSteps), the panels win from 2 rows (H=1024 r=256 T=100, 2 threads:
    // fp32 B=4 15.0 ms against 19.8-23.3 on row dots, B=2 10.3-11.8 against 12.9-13.6; bf16 B=4 8.5 against
    // 11.5-12.3); one row stays on row dots (fp32 6.2-6.6 against 8.0-8.4, bf16 4.2-4.4 against 5.1).
    dots = rowwise && forward && batch <= (steps >= kPackMinSteps ? 1 : kMaxDotBatch);
    rows = rowwise && !dots && batch <= kRowKernelsMax && (!forward || steps >= kPackMinSteps);
    TORCH_INTERNAL_ASSERT(!bf16 || (forward && (dots || rows)), "bf16 factors outside dpbf16_forward's cases");
    if (rows && forward) {
      const int64_t H = w.hidden(), r = w.w_hh_v.size(0);
      if (bf16) {
        thread_local std::vector<uint16_t> v_buf, u_buf;
        v_buf.resize(packed_pairs_size(H, r)), u_buf.resize(packed_pairs_size(r, 4 * H));
        vtp = pack_pairs_transposed(w.w_hh_v.data_ptr<c10::BFloat16>(), r, H, v_buf.data());
        utp = pack_pairs_transposed(w.w_hh_u.data_ptr<c10::BFloat16>(), 4 * H, r, u_buf.data());
      } else {
        thread_local std::vector<float> v_buf, u_buf;
        v_buf.resize(packed_size(H, r)), u_buf.resize(packed_size(r, 4 * H));
        vt = pack_transposed(w.w_hh_v.data_ptr<float>(), r, H, v_buf.data());
        ut = pack_transposed(w.w_hh_u.data_ptr<float>(), 4 * H, r, u_buf.data());
      }
    } else if (rows && steps >= kPackMinSteps) {  // backward: U_hh (4H, r) and V_hh (r, H) as they are, packed
      const int64_t H = w.hidden(), r = w.w_hh_v.size(0);
      thread_local std::vector<float> u_buf, v_buf;
      u_buf.resize(packed_size(4 * H, r)), v_buf.resize(packed_size(r, H));
      ub = pack_rows(w.w_hh_u.data_ptr<float>(), 4 * H, r, u_buf.data());
      vb = pack_rows(w.w_hh_v.data_ptr<float>(), r, H, v_buf.data());
    }
  }

  // s (B, r) scratch; h (B, H) and gates (B, 4H) contiguous (float whatever the factors' dtype).
  void forward(const Tensor& h, Tensor& s, Tensor& gates) const {
    const int64_t H = w.hidden(), r = w.w_hh_v.size(0);
    if (bf16 && dots) {
      small_batch_mm(h.data_ptr<float>(), batch, w.w_hh_v.data_ptr<c10::BFloat16>(), r, H, s.data_ptr<float>(), false);
      small_batch_mm(s.data_ptr<float>(), batch, w.w_hh_u.data_ptr<c10::BFloat16>(), 4 * H, r,
                     gates.data_ptr<float>(), true);
    } else if (bf16) {
      expand(vtp, H, r, h.data_ptr<float>(), H, batch, s.data_ptr<float>(), r, false);
      expand(utp, r, 4 * H, s.data_ptr<float>(), r, batch, gates.data_ptr<float>(), 4 * H, true);
    } else if (dots) {
      small_batch_mm(h.data_ptr<float>(), batch, w.w_hh_v.data_ptr<float>(), r, H, s.data_ptr<float>(), false);
      small_batch_mm(s.data_ptr<float>(), batch, w.w_hh_u.data_ptr<float>(), 4 * H, r, gates.data_ptr<float>(), true);
    } else if (rows) {
      expand(vt, H, r, h.data_ptr<float>(), H, batch, s.data_ptr<float>(), r, false);
      expand(ut, r, 4 * H, s.data_ptr<float>(), r, batch, gates.data_ptr<float>(), 4 * H, true);
    } else {
      at::mm_out(s, h, w.w_hh_v.t());
      gates.addmm_(s, w.w_hh_u.t());
    }
  }

  // ds (B, r) scratch; dpre (B, 4H) and dh (B, H, overwritten) contiguous.
  void backward(const Tensor& dpre, Tensor& ds, Tensor& dh) const {
    const int64_t H = w.hidden(), r = w.w_hh_v.size(0);
    if (rows) {
      const Panels u = ub.data ? ub : row_major(w.w_hh_u.data_ptr<float>(), r);
      const Panels v = vb.data ? vb : row_major(w.w_hh_v.data_ptr<float>(), H);
      expand(u, 4 * H, r, dpre.data_ptr<float>(), 4 * H, batch, ds.data_ptr<float>(), r, false);
      expand(v, r, H, ds.data_ptr<float>(), r, batch, dh.data_ptr<float>(), H, false);
    } else {
      at::mm_out(ds, dpre, w.w_hh_u);
      at::mm_out(dh, ds, w.w_hh_v);  // dL/dh_{t-1} through the recurrent product
    }
  }
};

// Runs the recurrence over pre (T, B, 4H; overwritten by the activated gates) from (h, c) (B, H;
// updated in place to the last state), writing h_t into out[t] and, when cells is defined, c_t.
template <typename acc_t>
void recur(Tensor& pre, Tensor& h, Tensor& c, Tensor& out, const Tensor& cells, const Factors& w) {
  const int64_t steps = pre.size(0), batch = pre.size(1), hidden = w.hidden();
  const Recurrent products(w, batch, true, steps);
  Tensor s = at::empty({batch, w.w_hh_v.size(0)}, h.options());  // h V_hh^T, reused every step
  acc_t* cp = c.data_ptr<acc_t>();
  for (int64_t t = 0; t < steps; ++t) {
    Tensor gates = pre[t], h_t = out[t];
    products.forward(t > 0 ? out[t - 1] : h, s, gates);
    acc_t *g = gates.data_ptr<acc_t>(), *hp = h_t.data_ptr<acc_t>();
    parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        step_forward(g + b * 4 * hidden, cp + b * hidden, hp + b * hidden, hidden, hidden);
    });
    if (cells.defined()) std::memcpy(cells[t].data_ptr<acc_t>(), cp, batch * hidden * sizeof(acc_t));
  }
  if (steps > 0) h.copy_(out[steps - 1]);
}

// BPTT. Returns dpre (T, B, 4H); dh, dc (B, H) enter as dL/dh_T, dL/dc_T and leave as dL/dh_0, dL/dc_0.
template <typename acc_t>
Tensor backprop(const Tensor& grad_out, Tensor& dh, Tensor& dc, const Tensor& gates, const Tensor& cells,
                const Tensor& c0, const Factors& w) {
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = w.hidden();
  const Recurrent products(w, batch, false, steps);
  Tensor dpre = empty_output(gates.sizes(), gates.options());
  Tensor ds = at::empty({batch, w.w_hh_u.size(1)}, dh.options());  // dpre U_hh, reused every step
  acc_t *dhp = dh.data_ptr<acc_t>(), *dcp = dc.data_ptr<acc_t>();
  for (int64_t t = steps - 1; t >= 0; --t) {
    const acc_t *g = gates[t].data_ptr<acc_t>(), *ct = cells[t].data_ptr<acc_t>(), *go = grad_out[t].data_ptr<acc_t>();
    const acc_t* cprev = (t > 0 ? cells[t - 1] : c0).data_ptr<acc_t>();
    Tensor dpre_t = dpre[t];
    acc_t* dp = dpre_t.data_ptr<acc_t>();
    parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < hidden; ++k) dhp[b * hidden + k] += go[b * hidden + k];
        step_backward(g + b * 4 * hidden, ct + b * hidden, cprev + b * hidden, dhp + b * hidden, dcp + b * hidden,
                      dp + b * 4 * hidden, hidden, hidden);
      }
    });
    products.backward(dpre_t, ds, dh);
  }
  return dpre;
}

// Gradients of the two factors (and of the input, when want_input) from dpre of all steps (large GEMMs).
// For pre += (inp V^T) U^T over rows: d inp = (dpre U) V, dU = dpre^T (inp V^T), dV = (dpre U)^T inp.
std::tuple<Tensor, Tensor, Tensor> factor_grads(const Tensor& dpre, const Tensor& inp, const Tensor& u,
                                                const Tensor& v, bool want_input) {
  const Tensor ds = at::mm(dpre, u);
  return {want_input ? at::mm(ds, v) : Tensor(), at::mm(dpre.t(), at::mm(inp, v.t())), at::mm(ds.t(), inp)};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Everything after the time loop, in the schema's order: (dx, dh0, dc0, dU_ih, dV_ih, dU_hh, dV_hh, dbias).
// The GEMMs run in dpre's dtype (the accumulation dtype, or bf16: see the backward op); dbias comes summed.
Grads finish_backward(const Tensor& dpre, const Tensor& dbias, const Tensor& x, const Tensor& h_prev,
                      const Tensor& dh, const Tensor& dc, const Factors& w, at::ScalarType out) {
  const Tensor rows = dpre.reshape({-1, dpre.size(-1)});
  auto [dx, d_ih_u, d_ih_v] = factor_grads(rows, x.reshape({-1, x.size(-1)}), w.w_ih_u, w.w_ih_v, true);
  // d h_prev was propagated step by step in backprop(): not recomputed here.
  [[maybe_unused]] auto [unused, d_hh_u, d_hh_v] =
      factor_grads(rows, h_prev.reshape({-1, h_prev.size(-1)}), w.w_hh_u, w.w_hh_v, false);
  return {dx.view(x.sizes()).to(out), dh.to(out),     dc.to(out),     d_ih_u.to(out),
          d_ih_v.to(out),             d_hh_u.to(out), d_hh_v.to(out), dbias.to(out)};
}

template <typename F>
void dispatch_acc(at::ScalarType acc, const F& f) {
  if (acc == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// ---------------------------------------------------------------------------------------------------
// The ops

bool lean_step_applies(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u, const Tensor& w_ih_v,
                       const Tensor& w_hh_u, const Tensor& w_hh_v, const c10::optional<Tensor>& bias, bool save,
                       const Tensor* w_hr = nullptr);
std::tuple<Tensor, Tensor> lean_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u,
                                     const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                     const c10::optional<Tensor>& bias,
                                     const Tensor* w_hr = nullptr);  // (below, with the cell)

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowrank_lstm_sequence_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih_u, const Tensor& w_ih_v,
    const Tensor& w_hh_u, const Tensor& w_hh_v, const c10::optional<Tensor>& bias, bool save) {
  checks::lowrank_lstm("lowrank_lstm_sequence_forward", x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, true);
  if (x.size(0) == 1 && lean_step_applies(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)) {
    auto [h1, c1] = lean_step(x.squeeze(0), h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias);
    const auto none = at::empty({0}, x.options().dtype(acc_of(x)));
    return {h1.unsqueeze(0), h1.clone(), c1, none, none.clone()};  // (outputs never alias each other)
  }
  const OpenMpScope openmp;  // see the top of this file
  const auto acc = acc_of(x);
  const bool bf16 = dpbf16_forward(x, w_ih_u, w_ih_v, w_hh_u, w_hh_v);
  const Factors w = factors_of(w_ih_u, w_ih_v, w_hh_u, w_hh_v, bf16 ? at::kBFloat16 : acc);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w.hidden();
  // pre becomes the activated gates
  Tensor pre = (bf16 ? input_projection(x, w, bias).to(acc) : input_projection(x.to(acc), w, bias)).contiguous();
  const auto dense = at::MemoryFormat::Contiguous;  // the loops index rows by raw pointer
  Tensor h = h0.to(acc).clone(dense), c = c0.to(acc).clone(dense);
  Tensor out = empty_output({steps, batch, hidden}, pre.options());
  Tensor cells = save ? empty_output({steps, batch, hidden}, pre.options()) : Tensor();
  dispatch_acc(acc, [&](auto tag) { recur<decltype(tag)>(pre, h, c, out, cells, w); });
  const auto none = at::empty({0}, pre.options());
  return {out.to(x.scalar_type()), h.to(x.scalar_type()), c.to(x.scalar_type()), save ? pre : none,
          save ? cells : none.clone()};
}

Grads lowrank_lstm_sequence_backward(const Tensor& grad_out, const Tensor& grad_h_n, const Tensor& grad_c_n,
                                     const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih_u,
                                     const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                     const Tensor& out, const Tensor& gates, const Tensor& cells) {
  checks::lowrank_lstm_backward("lowrank_lstm_sequence_backward", grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u,
                                 w_ih_v, w_hh_u, w_hh_v, out, gates, cells);
  const OpenMpScope openmp;
  const auto acc = acc_of(x);
  const Factors w = factors_of(w_ih_u, w_ih_v, w_hh_u, w_hh_v, acc);
  const auto dense = at::MemoryFormat::Contiguous;  // the loops index rows by raw pointer
  Tensor dh = grad_h_n.to(acc).clone(dense), dc = grad_c_n.to(acc).clone(dense);
  const Tensor c0a = c0.to(acc).contiguous(), ga = gates.to(acc).contiguous(), ca = cells.to(acc).contiguous();
  Tensor dpre;
  dispatch_acc(acc, [&](auto tag) {
    dpre = backprop<decltype(tag)>(grad_out.to(acc).contiguous(), dh, dc, ga, ca, c0a, w);
  });
  const Tensor dbias = dpre.reshape({-1, dpre.size(-1)}).sum(0);
  // bf16 on a CPU with AVX512-BF16: the factor and input gradients' GEMMs, most of the backward's work, run in
  // bf16 on ATen (dpre rounded to bf16, fp32 sums, as bf16 autograd of nn.LSTM does) on the bf16 x, h and
  // factors. H=1024 r=256 T=100, 2 threads, fwd+bwd: B=16 161-164 -> 131-141 ms, B=64 714-765 -> 525-532;
  // relative gradient error against float64 (T=20 B=8 H=128 r=32) 0.003 -> 0.004 (ad-hoc).
  if (x.scalar_type() == at::kBFloat16 && simd::has_dpbf16()) {
    const Tensor h_prev = at::cat({h0.unsqueeze(0), out.slice(0, 0, x.size(0) - 1)});
    const Factors w16 = factors_of(w_ih_u, w_ih_v, w_hh_u, w_hh_v, at::kBFloat16);
    return finish_backward(dpre.to(at::kBFloat16), dbias, x, h_prev, dh, dc, w16, x.scalar_type());
  }
  const Tensor h_prev = at::cat({h0.to(acc).unsqueeze(0), out.to(acc).slice(0, 0, x.size(0) - 1)});
  return finish_backward(dpre, dbias, x.to(acc), h_prev, dh, dc, w, x.scalar_type());
}

// The lean step for streaming inference (no save, B <= 4 rows, contiguous; float, or bf16 on a CPU with
// AVX512-BF16): the four products as row dots into one workspace and the fused update, three allocations and
// no other ATen op (a step at small H costs its host overhead). bf16 rows are widened into the workspace and
// the factors read as they are (vdpbf16ps; s rounded to bf16 as in the sequence's bf16 forward), h and c
// narrowed at the end: through the sequence op a bf16 step cost 76 us at H=256 r=64 against 20 us in fp32 (its
// ATen GEMMs and conversions; one AMD EPYC core, the public op). The cell runs it where it applies, and so does
// a sequence of one step (a swapped LowRankLSTM streaming a frame a call: the public op 41 -> 24 us at H=192
// r=48, one AMD EPYC core, alternating processes; its input GEMMs and clones were most of it).
// With nn.LSTM's projection w_hr (P, H) (a projected stack's layer), h is (B, P) and so is h1.
bool lean_step_applies(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u, const Tensor& w_ih_v,
                       const Tensor& w_hh_u, const Tensor& w_hh_v, const c10::optional<Tensor>& bias, bool save,
                       const Tensor* w_hr) {
  const auto dtype = x.scalar_type();
  bool lean = !save && x.size(-2) <= kMaxDotBatch &&  // x (B, D), or one step (1, B, D)
              (dtype == at::kFloat || (dtype == at::kBFloat16 && simd::has_dpbf16()));
  for (const Tensor* t : {&x, &h, &c, &w_ih_u, &w_ih_v, &w_hh_u, &w_hh_v, w_hr})
    lean = lean && (t == nullptr || (t->scalar_type() == dtype && t->is_contiguous()));
  if (bias.has_value()) lean = lean && bias->scalar_type() == dtype && bias->is_contiguous();
  return lean;
}

// x (B, D), h (B, R) and c (B, H), checked and lean_step_applies -> (h1 (B, R), c1 (B, H)); R is H, or P with w_hr.
std::tuple<Tensor, Tensor> lean_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u,
                                     const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                     const c10::optional<Tensor>& bias, const Tensor* w_hr) {
  const LowrankStep step = lowrank_step_of(w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, w_hr);
  const int64_t batch = x.size(0);
  Tensor work = at::empty({lean_work_floats(step, batch)}, x.options().dtype(at::kFloat));
  Tensor h1 = at::empty({batch, step.rec}, x.options()), c1 = at::empty({batch, step.hidden}, x.options());
  lean_step_into(step, batch, x.data_ptr(), h.data_ptr(), c.data_ptr(), h1.data_ptr(), c1.data_ptr(),
                 work.data_ptr<float>());
  return {h1, c1};
}

std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u,
                                                const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                                const c10::optional<Tensor>& bias, bool save) {
  checks::lowrank_lstm("lowrank_lstm_cell_forward", x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, false);
  if (!lean_step_applies(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save)) {  // one step of the sequence
    return amnets::lowrank_lstm_cell_forward<lowrank_lstm_sequence_forward>(x, h, c, w_ih_u, w_ih_v, w_hh_u,
                                                                          w_hh_v, bias, save);
  }
  auto [h1, c1] = lean_step(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias);
  return {h1, c1, at::empty({0}, x.options())};
}

}  // namespace

// The lean step's arithmetic on raw rows (kernels.h): the four products as row dots into `work` and the fused
// update; bf16 rows are widened into `work` and the factors read as they are (vdpbf16ps; s rounded to bf16 as
// in the sequence's bf16 forward), h1 and c1 narrowed at the end.
LowrankStep lowrank_step_of(const Tensor& w_ih_u, const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                            const c10::optional<Tensor>& bias, const Tensor* w_hr) {
  LowrankStep step{w_ih_u.data_ptr(), w_ih_v.data_ptr(), w_hh_u.data_ptr(), w_hh_v.data_ptr(),
                   bias.has_value() ? bias->data_ptr() : nullptr, w_ih_v.size(1), w_hh_u.size(0) / 4, w_ih_v.size(0),
                   w_hh_v.size(0), w_ih_u.scalar_type() == at::kBFloat16};
  step.w_hr = w_hr != nullptr ? w_hr->data_ptr() : nullptr;
  step.rec = w_hh_v.size(1);
  return step;
}

int64_t lean_work_floats(const LowrankStep& step, int64_t batch) {
  // s_ih, s_hh, gates, zeros for an absent h or c; bf16 also x, h, c, the update's h and the bias; a projection
  // also its input h (fp32) and its result (bf16)
  const int64_t hidden = step.hidden, rec = step.rec;
  return batch * (step.r_ih + step.r_hh + 4 * hidden + std::max(hidden, rec)) +
         (step.bf16 ? batch * (step.d + rec + 2 * hidden) + 4 * hidden : 0) +
         (step.w_hr != nullptr ? batch * (hidden + rec) : 0);
}

void lean_step_into(const LowrankStep& step, int64_t batch, const void* x, const void* h, const void* c, void* h1,
                    void* c1, float* work) {
  const int64_t d = step.d, hidden = step.hidden, rec = step.rec, rows = batch * hidden, h_rows = batch * rec;
  const bool projected = step.w_hr != nullptr;
  float *s_ih = work, *s_hh = s_ih + batch * step.r_ih, *gates = s_hh + batch * step.r_hh, *at = gates + 4 * rows;
  const auto take = [&](int64_t n) {
    float* p = at;
    at += n;
    return p;
  };
  float* zeros = take(std::max(rows, h_rows));
  const float *xf, *hf = zeros, *bf = nullptr;
  float *cf, *hout;
  if (step.bf16) {
    const auto widen = [&](const void* src, int64_t n) {
      float* dst = take(n);
      widen_bf16(static_cast<const c10::BFloat16*>(src), dst, n);
      return dst;
    };
    xf = widen(x, batch * d);
    if (h != nullptr) hf = widen(h, h_rows);
    cf = c != nullptr ? widen(c, rows) : take(rows);
    hout = take(rows);
    if (step.bias != nullptr) bf = widen(step.bias, 4 * hidden);
  } else {
    xf = static_cast<const float*>(x), cf = static_cast<float*>(c1);
    hout = projected ? take(rows) : static_cast<float*>(h1);  // (projected: h1 is the projection's result)
    if (h != nullptr) hf = static_cast<const float*>(h);
    if (c != nullptr) std::memcpy(cf, c, rows * sizeof(float));
    bf = static_cast<const float*>(step.bias);
  }
  if (h == nullptr || c == nullptr) std::fill(zeros, zeros + std::max(rows, h_rows), 0.0f);
  if (c == nullptr) std::fill(cf, cf + rows, 0.0f);
  const auto product = [&](const float* in, const void* w, int64_t out_rows, int64_t cols, float* y, bool acc) {
    if (step.bf16) {
      small_batch_mm(in, batch, static_cast<const c10::BFloat16*>(w), out_rows, cols, y, acc);
    } else {
      small_batch_mm(in, batch, static_cast<const float*>(w), out_rows, cols, y, acc);
    }
  };
  product(xf, step.w_ih_v, step.r_ih, d, s_ih, false);
  product(hf, step.w_hh_v, step.r_hh, rec, s_hh, false);
  product(s_ih, step.w_ih_u, 4 * hidden, step.r_ih, gates, false);
  product(s_hh, step.w_hh_u, 4 * hidden, step.r_hh, gates, true);
  finish_step(gates, bf, cf, hout, batch, hidden);
  if (projected) {  // h1 = h W_hr^T; bf16: h rounded to bf16 on the way in (small_batch_mm), as nn.LSTM's bf16 h is
    float* projection = step.bf16 ? take(h_rows) : static_cast<float*>(h1);
    product(hout, step.w_hr, rec, hidden, projection, false);
    if (step.bf16) narrow_bf16(projection, static_cast<c10::BFloat16*>(h1), h_rows);
  } else if (step.bf16) {
    narrow_bf16(hout, static_cast<c10::BFloat16*>(h1), rows);
  }
  if (step.bf16) narrow_bf16(cf, static_cast<c10::BFloat16*>(c1), rows);
}

namespace {

// One layer of a projected stack (nn.LSTM's proj_size P): in (B, D), h (B, P), c (B, H), w = (w_ih_u (4H, r_ih),
// w_ih_v (r_ih, D), w_hh_u (4H, r_hh), w_hh_v (r_hh, P), w_hr (P, H)) -> (h1 (B, P), c1 (B, H)). The lean step
// where it applies; else the products in ATen and the update in fp32 (fp64 for fp64), as LowRankLSTM's
// projected layers compute a step (amnets_kernels/nn/lowrank_lstm.py).
std::pair<Tensor, Tensor> projected_layer(const char* op, const Tensor& in, const Tensor& h, const Tensor& c,
                                          const Tensor* w, const c10::optional<Tensor>& bias, int64_t hidden) {
  TORCH_CHECK_VALUE(w[4].dim() != 2 || w[4].size(1) == hidden, op, ": w_hr must have shape (proj_size, H) with H = ",
                    "hidden_size = ", hidden, "; got ", checks::py_shape(w[4].sizes()));
  checks::lowrank_lstm(op, in, h, c, w[0], w[1], w[2], w[3], bias, false, w + 4);
  if (lean_step_applies(in, h, c, w[0], w[1], w[2], w[3], bias, false, w + 4)) {
    auto [h1, c1] = lean_step(in, h, c, w[0], w[1], w[2], w[3], bias, w + 4);
    return {std::move(h1), std::move(c1)};
  }
  const auto acc = in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor gates = (at::linear(at::linear(in, w[1]), w[0], bias) + at::linear(at::linear(h, w[3]), w[2])).to(acc);
  const auto g = gates.chunk(4, 1);  // i, f, g, o
  const Tensor c1 = at::sigmoid(g[1]) * c.to(acc) + at::sigmoid(g[0]) * at::tanh(g[2]);
  const Tensor h_full = (at::sigmoid(g[3]) * at::tanh(c1)).to(in.scalar_type());
  return {at::linear(h_full, w[4]), c1.to(in.scalar_type())};
}

}  // namespace

// A frame through a stack of low-rank layers (lstm_stack.h), each the cell's forward: the lean step where it applies.
// Five tensors a layer instead of four: nn.LSTM's projection w_hr (P, H) is the fifth, and h0, h_n and out are
// (.., P) (projected_layer).
std::tuple<Tensor, Tensor, Tensor> lowrank_lstm_stack_step(const Tensor& x, const c10::optional<Tensor>& h0,
                                                           const c10::optional<Tensor>& c0, at::TensorList weights,
                                                           const c10::List<c10::optional<Tensor>>& biases,
                                                           int64_t hidden) {
  const char* op = "lowrank_lstm_stack_step";
  // (not a structured binding: the lambda below captures them)
  const std::pair<bool, int64_t> shape = stack_projection(op, weights, static_cast<int64_t>(biases.size()), 4, hidden);
  const bool projected = shape.first;
  const int64_t rec = shape.second;
  const char* what = "weights must hold 4 factors (w_ih_u, w_ih_v, w_hh_u, w_hh_v), or 5 with a projection w_hr,";
  return lstm_stack_step(op, x, h0, c0, weights, projected ? 5 : 4, what, biases, hidden, rec,
                         [&](const Tensor& in, const Tensor& h, const Tensor& c, const Tensor* w,
                             const c10::optional<Tensor>& bias) {
                           if (projected) return projected_layer(op, in, h, c, w, bias, hidden);
                           auto [h1, c1, gates] = cell_forward(in, h, c, w[0], w[1], w[2], w[3], bias, false);
                           return std::pair{std::move(h1), std::move(c1)};
                         });
}

TORCH_LIBRARY_IMPL(amnets_native, CPU, m) {
  m.impl("lowrank_lstm_stack_step", &lowrank_lstm_stack_step);
  m.impl("lowrank_lstm_cell_forward", &cell_forward);
  m.impl("lowrank_lstm_cell_backward", &amnets::lowrank_lstm_cell_backward<lowrank_lstm_sequence_backward>);
  m.impl("lowrank_lstm_sequence_forward", &lowrank_lstm_sequence_forward);
  m.impl("lowrank_lstm_sequence_backward", &lowrank_lstm_sequence_backward);
}

}  // namespace amnets::cpu
