// CPU face of rnnt_loss and fused_joint_rnnt_loss; the contract is amnets_kernels/_ops/rnnt.py and the
// math is amnets_kernels/reference/rnnt.py.
//
// rnnt_loss forward: one streaming pass over V per lattice cell (b, t, u) gives the log-softmax
// denominator and the two log-probabilities the recursions need (blank, next label); alpha and beta
// then run per sequence in double (O(T U) work; the loss's precision lives there). Backward: one more
// pass over V per cell writes the gradient. Cells outside a sequence's lattice are never read.
// fused_joint_rnnt_loss computes the joint in tiles of cells with BLAS and keeps no more than a tile
// of logits; backward recomputes each tile (flash-attention style).
// Threads: OpenMP's (OpenMpScope), alternating with the GEMMs'; serial while the CPU is contended.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "fresh_pages.h"
#include "parallel.h"
#include "simd.h"

namespace amnets::cpu {
namespace {

using at::Tensor;
namespace simd = amnets::simd;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------------
// Row kernels over the vocabulary. float rows use the SIMD clones; double rows (the float64 oracle
// path) plain loops.

AMNETS_CLONES float row_logsumexp(const float* z, int64_t n) {
  simd::vfloat vm = simd::splat(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + simd::kWidth <= n; i += simd::kWidth) vm = simd::vmax(vm, simd::load(z + i));
  float m = simd::hmax(vm);
  for (int64_t k = i; k < n; ++k) m = std::max(m, z[k]);
  // All -inf: log 0. A +inf or NaN logit: NaN, so that the cell's log-probs and its sequence's cost
  // are NaN (every face: a non-finite logit gives a non-finite cost and a zero gradient).
  if (!std::isfinite(m)) return m == -std::numeric_limits<float>::infinity() ? m : std::numeric_limits<float>::quiet_NaN();
  simd::vfloat vs = simd::splat(0.f);
  for (i = 0; i + simd::kWidth <= n; i += simd::kWidth) vs += simd::exp(simd::load(z + i) - m);
  float s = simd::hsum(vs);
  for (int64_t k = i; k < n; ++k) s += std::exp(z[k] - m);
  return m + std::log(s);
}

// g[k] = clamp(occupancy * exp(z[k] - den), +-bound) * scale for every k, and 0 where the posterior part
// occupancy * exp(z[k] - den) is below 2^-100 (~8e-31). Most of a row's classes are that small in cells the best
// paths miss, and a denormal operand or product makes an x86 multiply-add microcode-assisted: the fused joint's
// two backward GEMMs over these rows (one Intel Xeon, 1 thread, (8, 200, 51, 320, 1024)) took 5.6 s of its
// 6.4 s fwd+bwd. Flushing only what is already denormal was not enough: 1e-37 times a weight of 0.05 is a
// denormal product. With the cut, the products stay normal for weights down to ~1e-8.
constexpr float kPosteriorCut = 0x1p-100f;

AMNETS_CLONES void row_softmax_grad(float* g, const float* z, int64_t n, float den, float occupancy,
                                    float bound, float scale) {
  int64_t i = 0;
  for (; i + simd::kWidth <= n; i += simd::kWidth) {
    simd::vfloat v = simd::exp(simd::load(z + i) - den) * occupancy;
    v = v < kPosteriorCut ? simd::splat(0.f) : v;  // v >= 0 (or NaN, kept)
    simd::store(g + i, simd::vmin(simd::vmax(v, simd::splat(-bound)), simd::splat(bound)) * scale);
  }
  for (; i < n; ++i) {
    const float v = occupancy * std::exp(z[i] - den);
    g[i] = std::clamp(v < kPosteriorCut ? 0.f : v, -bound, bound) * scale;
  }
}

double row_logsumexp(const double* z, int64_t n) {
  double m = *std::max_element(z, z + n);
  if (!std::isfinite(m)) return m == kNegInf ? m : std::numeric_limits<double>::quiet_NaN();
  double s = 0;
  for (int64_t k = 0; k < n; ++k) s += std::exp(z[k] - m);
  return m + std::log(s);
}

void row_softmax_grad(double* g, const double* z, int64_t n, double den, double occupancy, double bound,
                      double scale) {
  for (int64_t k = 0; k < n; ++k) g[k] = std::clamp(occupancy * std::exp(z[k] - den), -bound, bound) * scale;
}

// A row of `n` values in the accumulation type: the input itself when it already is, else a copy.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* row, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    buffer.resize(n);
    for (int64_t k = 0; k < n; ++k) buffer[k] = static_cast<acc_t>(row[k]);
    return buffer.data();
  }
}

double logaddexp(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  return std::max(a, b) + std::log1p(std::exp(-std::abs(a - b)));
}

// ---------------------------------------------------------------------------------------------------
// The lattice. Per-cell arrays are (B, T, U+1) contiguous; sequence b owns the block at b*T*(U+1).

struct Shape {
  int64_t batch, frames, labels_plus_1;  // padded B, T, U+1
  int64_t cells() const { return frames * labels_plus_1; }
};

struct Lengths {
  const int32_t* frames;  // T_b
  const int32_t* labels;  // U_b
  const int32_t* targets;  // (B, U) labels; entries at u >= U_b are never read
};

// alpha over one sequence (row by row in double), -inf off the lattice; returns log P.
template <typename acc_t>
double alphas_one(acc_t* alpha, const acc_t* lp_blank, const acc_t* lp_y, int64_t frames, int64_t labels,
                  const Shape& s) {
  std::fill(alpha, alpha + s.cells(), static_cast<acc_t>(kNegInf));
  std::vector<double> prev(labels + 1, kNegInf), cur(labels + 1);
  for (int64_t t = 0; t < frames; ++t) {
    for (int64_t u = 0; u <= labels; ++u) {
      const int64_t at = t * s.labels_plus_1 + u;
      if (t == 0 && u == 0) {
        cur[0] = 0.0;
      } else {
        double stay = t > 0 ? prev[u] + lp_blank[at - s.labels_plus_1] : kNegInf;
        double emit = u > 0 ? cur[u - 1] + lp_y[at - 1] : kNegInf;
        cur[u] = logaddexp(stay, emit);
      }
      alpha[at] = static_cast<acc_t>(cur[u]);
    }
    std::swap(prev, cur);
  }
  return prev[labels] + lp_blank[(frames - 1) * s.labels_plus_1 + labels];
}

// beta over one sequence, from the terminal cell back; -inf off the lattice.
template <typename acc_t>
void betas_one(acc_t* beta, const acc_t* lp_blank, const acc_t* lp_y, int64_t frames, int64_t labels,
               const Shape& s) {
  std::fill(beta, beta + s.cells(), static_cast<acc_t>(kNegInf));
  std::vector<double> next(labels + 1, kNegInf), cur(labels + 1);
  for (int64_t t = frames - 1; t >= 0; --t) {
    for (int64_t u = labels; u >= 0; --u) {
      const int64_t at = t * s.labels_plus_1 + u;
      if (t == frames - 1 && u == labels) {
        cur[u] = lp_blank[at];
      } else {
        double stay = t + 1 < frames ? next[u] + lp_blank[at] : kNegInf;
        double emit = u < labels ? cur[u + 1] + lp_y[at] : kNegInf;
        cur[u] = logaddexp(stay, emit);
      }
      beta[at] = static_cast<acc_t>(cur[u]);
    }
    std::swap(next, cur);
  }
}

// alphas, betas (when save) and costs from the per-cell log-probabilities; sequences in parallel.
template <typename acc_t, typename cost_t>
void run_lattice(const Shape& s, const Lengths& len, const acc_t* lp_blank, const acc_t* lp_y, acc_t* alphas,
                 acc_t* betas, cost_t* costs, bool save) {
  const int64_t tasks = save ? 2 * s.batch : s.batch;  // alpha and beta of a sequence run concurrently
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task % s.batch;
      const int64_t off = b * s.cells();
      if (task < s.batch) {
        costs[b] = static_cast<cost_t>(
            -alphas_one(alphas + off, lp_blank + off, lp_y + off, len.frames[b], len.labels[b], s));
      } else {
        betas_one(betas + off, lp_blank + off, lp_y + off, len.frames[b], len.labels[b], s);
      }
    }
  });
}

Lengths lengths_of(const Tensor& targets, const Tensor& logit_lengths, const Tensor& target_lengths) {
  return {logit_lengths.data_ptr<int32_t>(), target_lengths.data_ptr<int32_t>(), targets.data_ptr<int32_t>()};
}

// Every (b, t, u) of the padded lattice in parallel; `visit(b, t, u, cell)` sees only live cells,
// `dead(cell)` the others.
template <typename Live, typename Dead>
void for_each_cell(const Shape& s, const Lengths& len, int64_t grain, const Live& visit, const Dead& dead) {
  parallel_for(0, s.batch * s.cells(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t cell = begin; cell < end; ++cell) {
      const int64_t b = cell / s.cells(), t = cell / s.labels_plus_1 % s.frames, u = cell % s.labels_plus_1;
      if (t < len.frames[b] && u <= len.labels[b]) {
        visit(b, t, u, cell);
      } else {
        dead(cell);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Per-cell work shared by both losses: the forward's three numbers per cell, and the backward's
// gradient row. A row is the cell's V logits in the accumulation type.

template <typename acc_t>
struct CellLogProbs {
  acc_t den, blank, label;  // logsumexp (0 when not fused), lp_blank, lp_y (-inf when u = U_b)
};

template <typename acc_t>
CellLogProbs<acc_t> cell_log_probs(const acc_t* row, int64_t vocab, int64_t blank, int64_t label, bool fused) {
  const acc_t den = fused ? row_logsumexp(row, vocab) : acc_t(0);
  return {den, row[blank] - den, label >= 0 ? row[label] - den : acc_t(kNegInf)};
}

// What backward reads of the forward: the saved lattice and the arguments that shape the gradient.
template <typename acc_t>
struct Saved {
  Shape s;
  Lengths len;
  const acc_t *alpha, *beta, *den;
  int64_t blank;
  acc_t bound;  // the clamp, or +inf
  bool fused;

  int64_t label_of(int64_t b, int64_t u) const {
    return u < len.labels[b] ? len.targets[b * (s.labels_plus_1 - 1) + u] : -1;
  }
  double log_p(int64_t b) const { return beta[b * s.cells()]; }  // beta(0, 0); the costs may be fp16

  // out[k] = d(cost_b)/d(logit k of cell) * scale: every class gets occupancy * softmax (when fused),
  // blank and the next label lose their arc's posterior; the clamp bounds each final entry.
  void gradient_row(acc_t* out, const acc_t* row, int64_t vocab, int64_t b, int64_t t, int64_t u,
                    int64_t cell, double scale) const {
    const double lp = log_p(b), a = alpha[cell], d = den[cell];
    const int64_t frames = len.frames[b], labels = len.labels[b], label = label_of(b, u);
    const double after_blank = t + 1 < frames ? double(beta[cell + s.labels_plus_1]) : (u == labels ? 0.0 : kNegInf);
    const double after_label = u < labels ? double(beta[cell + 1]) : kNegInf;
    const double occupancy = fused ? std::exp(a + double(beta[cell]) - lp) : 0.0;
    if (fused) {
      row_softmax_grad(out, row, vocab, acc_t(d), acc_t(occupancy), bound, acc_t(scale));
    } else {  // only the arcs' classes below have a gradient (0 * exp(z) overflowed to NaN for a score z > 88)
      std::fill(out, out + vocab, acc_t(0));
    }
    auto fix = [&](int64_t k, double log_arc) {
      const double soft = fused ? occupancy * std::exp(double(row[k]) - d) : 0.0;
      double v = soft - std::exp(a + double(row[k]) - d + log_arc - lp);
      if constexpr (std::is_same_v<acc_t, float>) v = std::abs(v) < kPosteriorCut ? 0.0 : v;  // as row_softmax_grad
      out[k] = acc_t(std::clamp(v, -double(bound), double(bound)) * scale);
    };
    fix(blank, after_blank);
    if (label >= 0) fix(label, after_label);
  }
};

template <typename acc_t>
Saved<acc_t> saved_of(const Shape& s, const Lengths& len, const Tensor& alphas, const Tensor& betas,
                      const Tensor& den, int64_t blank, double clamp, bool fused) {
  return {s, len, alphas.data_ptr<acc_t>(), betas.data_ptr<acc_t>(), den.data_ptr<acc_t>(), blank,
          clamp > 0 ? acc_t(clamp) : std::numeric_limits<acc_t>::infinity(), fused};
}

// Per-cell buffers of the forward: den, lp_blank, lp_y (B, T, U+1) in the accumulation dtype.
struct CellArrays {
  Tensor den, blank, label;
  explicit CellArrays(const Shape& s, at::ScalarType acc, const at::TensorOptions& opts)
      : den(at::zeros({s.batch, s.frames, s.labels_plus_1}, opts.dtype(acc))),
        blank(at::full_like(den, kNegInf)),
        label(at::full_like(den, kNegInf)) {}
  template <typename acc_t>
  void set(int64_t cell, const CellLogProbs<acc_t>& p) {
    den.data_ptr<acc_t>()[cell] = p.den;
    blank.data_ptr<acc_t>()[cell] = p.blank;
    label.data_ptr<acc_t>()[cell] = p.label;
  }
};

// alphas/betas/costs from the cell arrays; the op's forward outputs.
template <typename acc_t, typename cost_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> finish_forward(const Shape& s, const Lengths& len, CellArrays& cells,
                                                         const at::TensorOptions& cost_opts, bool save) {
  Tensor alphas = at::empty_like(cells.den), betas = save ? at::empty_like(cells.den) : Tensor();
  Tensor costs = at::empty({s.batch}, cost_opts);
  run_lattice(s, len, cells.blank.data_ptr<acc_t>(), cells.label.data_ptr<acc_t>(), alphas.data_ptr<acc_t>(),
              save ? betas.data_ptr<acc_t>() : nullptr, costs.data_ptr<cost_t>(), save);
  if (!save) {
    auto none = at::empty({0}, cells.den.options());
    return {costs, none, none.clone(), none.clone()};
  }
  return {costs, alphas, betas, cells.den};
}

// ---------------------------------------------------------------------------------------------------
// rnnt_loss

// The logits' lattice and the checked int32 labels (csrc/checks.h); the kernels index memory by them.
struct Labels {
  Tensor targets, frames, labels;
  Labels(const char* op, const Tensor& targets_in, const Tensor& frames_in, const Tensor& labels_in,
         const Shape& s, int64_t vocab, int64_t blank) {
    std::tie(targets, frames, labels) = checks::rnnt_labels(op, targets_in, frames_in, labels_in, s.batch, s.frames,
                                                            s.labels_plus_1, vocab, blank);
  }
  Lengths lengths() const { return lengths_of(targets, frames, labels); }
};

Shape logits_shape(const char* op, const Tensor& logits) {
  checks::dims(op, "logits", logits, 4);
  checks::floating(op, "logits", logits);
  return {logits.size(0), logits.size(1), logits.size(2)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnnt_loss_forward(const Tensor& logits_in, const Tensor& targets,
                                                             const Tensor& logit_lengths,
                                                             const Tensor& target_lengths, int64_t blank,
                                                             double /*clamp*/, bool fused_log_softmax, bool save) {
  const Shape s = logits_shape("rnnt_loss_forward", logits_in);
  const int64_t vocab = logits_in.size(3), labels = s.labels_plus_1 - 1;
  const Labels checked("rnnt_loss_forward", targets, logit_lengths, target_lengths, s, vocab, blank);
  const Lengths len = checked.lengths();
  const OpenMpScope openmp;  // the loops alternate with ATen's (parallel.h)
  const Tensor logits = logits_in.contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rnnt_loss_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CellArrays cells(s, c10::CppTypeToScalarType<acc_t>::value, logits.options());
    const scalar_t* z = logits.data_ptr<scalar_t>();
    for_each_cell(
        s, len, 16,
        [&](int64_t b, int64_t t, int64_t u, int64_t cell) {
          thread_local std::vector<acc_t> buffer;
          const acc_t* row = as_acc<scalar_t, acc_t>(z + cell * vocab, vocab, buffer);
          const int64_t label = u < len.labels[b] ? len.targets[b * labels + u] : -1;
          cells.set(cell, cell_log_probs(row, vocab, blank, label, fused_log_softmax));
        },
        [](int64_t) {});
    out = finish_forward<acc_t, scalar_t>(s, len, cells, logits.options(), save);
  });
  return out;
}

Tensor rnnt_loss_backward(const Tensor& grad_costs, const Tensor& logits_in, const Tensor& targets,
                          const Tensor& logit_lengths, const Tensor& target_lengths, const Tensor& /*costs*/,
                          const Tensor& alphas_in, const Tensor& betas_in, const Tensor& den_in, int64_t blank,
                          double clamp, bool fused_log_softmax) {
  constexpr const char* op = "rnnt_loss_backward";
  const Shape s = logits_shape(op, logits_in);
  const int64_t vocab = logits_in.size(3);
  const Labels checked(op, targets, logit_lengths, target_lengths, s, vocab, blank);
  const Lengths len = checked.lengths();
  const OpenMpScope openmp;  // the loops alternate with ATen's (parallel.h)
  checks::rnnt_saved(op, grad_costs, alphas_in, betas_in, den_in, s.batch, s.frames, s.labels_plus_1,
                     logits_in.scalar_type());
  const Tensor logits = logits_in.contiguous(), alphas = alphas_in.contiguous(), betas = betas_in.contiguous(),
               den = den_in.contiguous();
  Tensor grad = empty_output(logits.sizes(), logits.options());  // logits are contiguous: so is their gradient
  const auto scales = grad_costs.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rnnt_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor alpha = alphas.to(acc), beta = betas.to(acc), norm = den.to(acc);  // no copy when already acc
    const auto saved = saved_of<acc_t>(s, len, alpha, beta, norm, blank, clamp, fused_log_softmax);
    const double* scale = scales.data_ptr<double>();
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    auto zero_row = [&](int64_t cell) { std::fill(g + cell * vocab, g + (cell + 1) * vocab, scalar_t(0)); };
    for_each_cell(
        s, len, 16,
        [&](int64_t b, int64_t t, int64_t u, int64_t cell) {
          if (!std::isfinite(saved.log_p(b))) return zero_row(cell);  // a non-finite cost: no gradient
          thread_local std::vector<acc_t> in_buffer, out_buffer;
          const acc_t* row = as_acc<scalar_t, acc_t>(z + cell * vocab, vocab, in_buffer);
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            saved.gradient_row(reinterpret_cast<acc_t*>(g + cell * vocab), row, vocab, b, t, u, cell, scale[b]);
          } else {
            out_buffer.resize(vocab);
            saved.gradient_row(out_buffer.data(), row, vocab, b, t, u, cell, scale[b]);
            std::copy(out_buffer.begin(), out_buffer.end(), g + cell * vocab);
          }
        },
        zero_row);
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------------
// fused_joint_rnnt_loss: the logits of sequence b are act(enc[b, t] + pred[b, u]) @ W^T + bias over its
// live cells only. They are built a tile of whole frames at a time (about kTileRows cells), as a
// (rows, V) matrix by one BLAS call, used, and dropped.

constexpr int64_t kTileRows = 256;

struct Joint {
  Tensor enc, pred, weight, bias;  // in the accumulation dtype; bias may be undefined
  std::string activation;
  int64_t hidden, vocab;

  Joint(const Tensor& e, const Tensor& p, const Tensor& w, const c10::optional<Tensor>& b, at::ScalarType acc,
        std::string act)
      : enc(e.to(acc)), pred(p.to(acc)), weight(w.to(acc)), bias(b.has_value() ? b->to(acc) : Tensor()),
        activation(std::move(act)), hidden(e.size(2)), vocab(w.size(0)) {}

  // Frames [t0, t1) x label positions [0, labels] of sequence b: the activations (rows, H) and the
  // logits (rows, V), row (t - t0) * (labels + 1) + u.
  std::pair<Tensor, Tensor> tile(int64_t b, int64_t t0, int64_t t1, int64_t labels) const {
    Tensor pre = enc[b].slice(0, t0, t1).unsqueeze(1) + pred[b].slice(0, 0, labels + 1).unsqueeze(0);
    Tensor act = activation == "tanh" ? pre.tanh_() : activation == "relu" ? pre.relu_() : pre;
    act = act.reshape({-1, hidden});
    Tensor logits = bias.defined() ? at::addmm(bias, act, weight.t()) : at::mm(act, weight.t());
    return {act, logits};
  }

  // d(act)/d(pre) expressed through the activation's output.
  Tensor backward_through_activation(const Tensor& grad_act, const Tensor& act) const {
    if (activation == "tanh") return grad_act * (1 - act * act);
    if (activation == "relu") return grad_act * (act > 0);
    return grad_act;
  }
};

// The lattice (B, T, U+1) of checked joint tensors and activation (Joint's tile() would run any other string as the
// identity).
Shape joint_shape(const char* op, const Tensor& enc, const Tensor& pred, const Tensor& weight,
                  const c10::optional<Tensor>& bias, c10::string_view activation) {
  checks::fused_joint_tensors(op, enc, pred, weight, bias, std::string(activation));
  return {enc.size(0), enc.size(1), pred.size(1)};
}

int64_t frames_per_tile(int64_t labels) { return std::max<int64_t>(1, kTileRows / (labels + 1)); }

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_joint_rnnt_loss_forward(
    const Tensor& enc, const Tensor& pred, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& targets, const Tensor& logit_lengths, const Tensor& target_lengths, int64_t blank,
    c10::string_view activation, double /*clamp*/, bool save) {
  const Shape s = joint_shape("fused_joint_rnnt_loss_forward", enc, pred, weight, bias, activation);
  const int64_t labels_pad = s.labels_plus_1 - 1;
  const Labels checked("fused_joint_rnnt_loss_forward", targets, logit_lengths, target_lengths, s, weight.size(0),
                       blank);
  const Lengths len = checked.lengths();
  OpenMpScope openmp;  // the loops alternate with ATen's (parallel.h); checkpoints between the GEMMs
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, enc.scalar_type(), "fused_joint_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Joint joint(enc, pred, weight, bias, acc, std::string(activation));
    CellArrays cells(s, acc, enc.options());
    for (int64_t b = 0; b < s.batch; ++b) {
      const int64_t frames = len.frames[b], labels = len.labels[b], step = frames_per_tile(labels);
      for (int64_t t0 = 0; t0 < frames; t0 += step) {
        const int64_t t1 = std::min(frames, t0 + step);
        openmp.checkpoint();
        const Tensor logits = joint.tile(b, t0, t1, labels).second;
        const acc_t* l = logits.data_ptr<acc_t>();
        parallel_for(0, (t1 - t0) * (labels + 1), 8, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t t = t0 + r / (labels + 1), u = r % (labels + 1);
            const int64_t label = u < labels ? len.targets[b * labels_pad + u] : -1;
            cells.set((b * s.frames + t) * s.labels_plus_1 + u,
                      cell_log_probs(l + r * joint.vocab, joint.vocab, blank, label, true));
          }
        });
      }
    }
    out = finish_forward<acc_t, scalar_t>(s, len, cells, enc.options(), save);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_joint_rnnt_loss_backward(
    const Tensor& grad_costs, const Tensor& enc, const Tensor& pred, const Tensor& weight,
    const c10::optional<Tensor>& bias, const Tensor& targets, const Tensor& logit_lengths,
    const Tensor& target_lengths, const Tensor& /*costs*/, const Tensor& alphas, const Tensor& betas,
    const Tensor& den, int64_t blank, c10::string_view activation, double clamp) {
  constexpr const char* op = "fused_joint_rnnt_loss_backward";
  const Shape s = joint_shape(op, enc, pred, weight, bias, activation);
  const Labels checked(op, targets, logit_lengths, target_lengths, s, weight.size(0), blank);
  const Lengths len = checked.lengths();
  OpenMpScope openmp;  // the loops alternate with ATen's (parallel.h); checkpoints between the GEMMs
  checks::rnnt_saved(op, grad_costs, alphas, betas, den, s.batch, s.frames, s.labels_plus_1, enc.scalar_type());
  const auto scales = grad_costs.to(at::kDouble).contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, enc.scalar_type(), "fused_joint_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Joint joint(enc, pred, weight, bias, acc, std::string(activation));
    const Tensor alpha = alphas.to(acc).contiguous(), beta = betas.to(acc).contiguous(), norm = den.to(acc).contiguous();
    const auto saved = saved_of<acc_t>(s, len, alpha, beta, norm, blank, clamp, true);
    Tensor grad_enc = at::zeros_like(joint.enc), grad_pred = at::zeros_like(joint.pred);
    Tensor grad_weight = at::zeros_like(joint.weight), grad_bias = at::zeros({joint.vocab}, joint.enc.options());
    for (int64_t b = 0; b < s.batch; ++b) {
      if (!std::isfinite(saved.log_p(b))) continue;  // a non-finite cost: no gradient
      const int64_t frames = len.frames[b], labels = len.labels[b], step = frames_per_tile(labels);
      for (int64_t t0 = 0; t0 < frames; t0 += step) {
        const int64_t t1 = std::min(frames, t0 + step);
        openmp.checkpoint();
        auto [act, grad_logits] = joint.tile(b, t0, t1, labels);  // logits, overwritten by their gradient
        acc_t* l = grad_logits.data_ptr<acc_t>();
        parallel_for(0, (t1 - t0) * (labels + 1), 8, [&](int64_t begin, int64_t end) {
          thread_local std::vector<acc_t> row;
          for (int64_t r = begin; r < end; ++r) {
            const int64_t t = t0 + r / (labels + 1), u = r % (labels + 1);
            row.assign(l + r * joint.vocab, l + (r + 1) * joint.vocab);
            saved.gradient_row(l + r * joint.vocab, row.data(), joint.vocab, b, t, u,
                               (b * s.frames + t) * s.labels_plus_1 + u, scales.data_ptr<double>()[b]);
          }
        });
        grad_weight.addmm_(grad_logits.t(), act);
        grad_bias += grad_logits.sum(0);
        openmp.checkpoint();
        const Tensor grad_pre = joint.backward_through_activation(at::mm(grad_logits, joint.weight), act)
                                    .view({t1 - t0, labels + 1, joint.hidden});
        grad_enc[b].slice(0, t0, t1) += grad_pre.sum(1);
        grad_pred[b].slice(0, 0, labels + 1) += grad_pre.sum(0);
      }
    }
    const auto dtype = enc.scalar_type();
    out = {grad_enc.to(dtype), grad_pred.to(dtype), grad_weight.to(dtype),
           bias.has_value() ? grad_bias.to(dtype) : at::empty({0}, enc.options())};
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(amnets_native, CPU, m) {
  m.impl("rnnt_loss_forward", &rnnt_loss_forward);
  m.impl("rnnt_loss_backward", &rnnt_loss_backward);
  m.impl("fused_joint_rnnt_loss_forward", &fused_joint_rnnt_loss_forward);
  m.impl("fused_joint_rnnt_loss_backward", &fused_joint_rnnt_loss_backward);
}

}  // namespace amnets::cpu
