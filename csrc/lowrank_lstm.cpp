// torch.ops.amnets.lowrank_lstm_cell and lowrank_lstm_sequence: the public ops, their forward and backward
// ops, their autograd and the route to a face (csrc/face.h), as csrc/bsr.cpp does for bsr_linear. The
// kernels are the faces' (csrc/cpu/lowrank_lstm.cpp, csrc/cuda/lowrank_lstm.cu, amnets_faces::*); the
// fake kernels are in Python (amnets_kernels/_ops/lowrank_lstm.py).
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "face.h"

namespace amnets {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Bias = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

using CellForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, const Tensor&, const Bias&,
                                                          bool);
using CellBackwardSig = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&);
using SequenceForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Bias&, bool);
using SequenceBackwardSig = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const Tensor&);

constexpr face::Op kCell = face::Op::LowrankLstmCell, kSequence = face::Op::LowrankLstmSequence;

// An empty batch (B = 0) is answered here, the same on every face (some faces' kernels cannot take it).
at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Grads no_grads(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u, const Tensor& w_ih_v,
               const Tensor& w_hh_u, const Tensor& w_hh_v) {
  return {at::zeros_like(x), at::zeros_like(h), at::zeros_like(c), at::zeros_like(w_ih_u), at::zeros_like(w_ih_v),
          at::zeros_like(w_hh_u), at::zeros_like(w_hh_v), at::zeros({w_ih_u.size(0)}, w_ih_u.options())};
}

// ---------------------------------------------------------------------------------------------------
// The routes: checks, then the face.

std::tuple<Tensor, Tensor, Tensor> cell_forward(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u,
                                                const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                                const Bias& bias, bool save) {
  const int64_t hidden =
      checks::lowrank_lstm_args("lowrank_lstm_cell", x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, false);
  if (x.size(0) == 0) {
    return {h.clone(), c.clone(), save ? x.new_empty({0, 4 * hidden}, acc_type(x)) : x.new_empty({0}, acc_type(x))};
  }
  static const face::Route<CellForwardSig> route("lowrank_lstm_cell_forward");
  return route(face::native(kCell, x), x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
}

Grads cell_backward(const Tensor& grad_h1, const Tensor& grad_c1, const Tensor& x, const Tensor& h, const Tensor& c,
                    const Tensor& w_ih_u, const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                    const Tensor& c1, const Tensor& gates) {
  constexpr const char* op = "lowrank_lstm_cell_backward";
  const int64_t hidden = checks::lowrank_lstm_args(op, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, std::nullopt, false);
  const at::IntArrayRef state = h.sizes();
  checks::saved(op, "grad_h1", grad_h1, state);
  checks::saved(op, "grad_c1", grad_c1, state);
  checks::saved(op, "c1", c1, state);
  checks::saved(op, "gates", gates, {x.size(0), 4 * hidden});
  if (x.size(0) == 0) return no_grads(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v);
  static const face::Route<CellBackwardSig> route("lowrank_lstm_cell_backward");
  return route(face::native(kCell, x), grad_h1, grad_c1, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sequence_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                                    const Tensor& w_ih_u, const Tensor& w_ih_v,
                                                                    const Tensor& w_hh_u, const Tensor& w_hh_v,
                                                                    const Bias& bias, bool save) {
  const int64_t hidden =
      checks::lowrank_lstm_args("lowrank_lstm_sequence", x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, true);
  if (x.size(1) == 0) {
    const int64_t steps = x.size(0);
    const auto workspace = [&](int64_t width) {
      return save ? x.new_empty({steps, 0, width}, acc_type(x)) : x.new_empty({0}, acc_type(x));
    };
    return {x.new_empty({steps, 0, hidden}), h0.clone(), c0.clone(), workspace(4 * hidden), workspace(hidden)};
  }
  static const face::Route<SequenceForwardSig> route("lowrank_lstm_sequence_forward");
  return route(face::native(kSequence, x), x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
}

Grads sequence_backward(const Tensor& grad_out, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
                        const Tensor& h0, const Tensor& c0, const Tensor& w_ih_u, const Tensor& w_ih_v,
                        const Tensor& w_hh_u, const Tensor& w_hh_v, const Tensor& out, const Tensor& gates,
                        const Tensor& cells) {
  constexpr const char* op = "lowrank_lstm_sequence_backward";
  const int64_t hidden = checks::lowrank_lstm_args(op, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, std::nullopt, true);
  const int64_t steps = x.size(0), batch = x.size(1);
  checks::saved(op, "grad_out", grad_out, {steps, batch, hidden});
  checks::saved(op, "grad_h_n", grad_h_n, {batch, hidden});
  checks::saved(op, "grad_c_n", grad_c_n, {batch, hidden});
  checks::saved(op, "out", out, {steps, batch, hidden});
  checks::saved(op, "gates", gates, {steps, batch, 4 * hidden});
  checks::saved(op, "cells", cells, {steps, batch, hidden});
  if (batch == 0) return no_grads(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v);
  static const face::Route<SequenceBackwardSig> route("lowrank_lstm_sequence_backward");
  return route(face::native(kSequence, x), grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v,
               out, gates, cells);
}

// ---------------------------------------------------------------------------------------------------
// Autograd: backward computes all eight gradients (x, h, c, the four factors, bias) under the backend of
// the forward; autograd gets those the inputs want.

void remember(AutogradContext* ctx, const Bias& bias) {
  ctx->saved_data["has_bias"] = bias.has_value();
  ctx->saved_data["backend"] = static_cast<int64_t>(face::current());
}

variable_list wanted(AutogradContext* ctx, const Grads& g) {
  const Tensor all[] = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g),
                        std::get<4>(g), std::get<5>(g), std::get<6>(g), std::get<7>(g)};
  const int inputs = ctx->saved_data["has_bias"].toBool() ? 8 : 7;  // the tensor inputs, in order
  variable_list grads(9);  // one per argument of forward; save gets none
  for (int i = 0; i < inputs; ++i)
    if (ctx->needs_input_grad(i)) grads[i] = all[i];
  return grads;
}

class Cell : public torch::autograd::Function<Cell> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& c,
                               const Tensor& w_ih_u, const Tensor& w_ih_v, const Tensor& w_hh_u,
                               const Tensor& w_hh_v, const Bias& bias, bool save) {
    remember(ctx, bias);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<CellForwardSig>("lowrank_lstm_cell_forward");
    auto [h1, c1, gates] = op.call(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
    ctx->mark_non_differentiable({gates});
    ctx->save_for_backward({x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c1, gates});
    return {h1, c1, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    face::Scope backend(static_cast<face::Backend>(ctx->saved_data["backend"].toInt()));
    const auto s = ctx->get_saved_variables();
    static const auto op = face::op<CellBackwardSig>("lowrank_lstm_cell_backward");
    return wanted(ctx, op.call(grads[0], grads[1], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]));
  }
};

class Sequence : public torch::autograd::Function<Sequence> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih_u, const Tensor& w_ih_v, const Tensor& w_hh_u,
                               const Tensor& w_hh_v, const Bias& bias, bool save) {
    remember(ctx, bias);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<SequenceForwardSig>("lowrank_lstm_sequence_forward");
    auto [out, h_n, c_n, gates, cells] = op.call(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
    ctx->mark_non_differentiable({gates, cells});
    ctx->save_for_backward({x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, out, gates, cells});
    return {out, h_n, c_n, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    face::Scope backend(static_cast<face::Backend>(ctx->saved_data["backend"].toInt()));
    const auto s = ctx->get_saved_variables();
    static const auto op = face::op<SequenceBackwardSig>("lowrank_lstm_sequence_backward");
    return wanted(ctx, op.call(grads[0], grads[1], grads[2], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                               s[9]));
  }
};

std::tuple<Tensor, Tensor, Tensor> cell_forward_autograd(const Tensor& x, const Tensor& h, const Tensor& c,
                                                         const Tensor& w_ih_u, const Tensor& w_ih_v,
                                                         const Tensor& w_hh_u, const Tensor& w_hh_v, const Bias& bias,
                                                         bool save) {
  const auto out = Cell::apply(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sequence_forward_autograd(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih_u, const Tensor& w_ih_v,
    const Tensor& w_hh_u, const Tensor& w_hh_v, const Bias& bias, bool save) {
  const auto out = Sequence::apply(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---------------------------------------------------------------------------------------------------
// The public ops: save what backward needs only when a gradient is wanted.

std::tuple<Tensor, Tensor> lowrank_lstm_cell(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih_u,
                                             const Tensor& w_ih_v, const Tensor& w_hh_u, const Tensor& w_hh_v,
                                             const Bias& bias) {
  static const auto op = face::op<CellForwardSig>("lowrank_lstm_cell_forward");
  const bool save = face::wants_grad({&x, &h, &c, &w_ih_u, &w_ih_v, &w_hh_u, &w_hh_v}, bias);
  auto [h1, c1, gates] = op.call(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
  return {h1, c1};
}

std::tuple<Tensor, Tensor, Tensor> lowrank_lstm_sequence(const Tensor& x, const Bias& h0, const Bias& c0,
                                                         const Tensor& w_ih_u, const Tensor& w_ih_v,
                                                         const Tensor& w_hh_u, const Tensor& w_hh_v,
                                                         const Bias& bias) {
  constexpr const char* name = "lowrank_lstm_sequence";
  Tensor zeros;
  if (!h0.has_value() || !c0.has_value()) {  // what the zero state's shape is read from
    checks::dims(name, "x", x, 3);
    checks::dims(name, "w_hh_v", w_hh_v, 2);
    // x's batch as a SymInt: x.size(1) would specialise a dynamic batch under torch.export.
    zeros = at::zeros_symint({x.sym_size(1), w_hh_v.sym_size(1)}, x.options());
  }
  const Tensor& h = h0.has_value() ? *h0 : zeros;
  const Tensor& c = c0.has_value() ? *c0 : zeros;
  static const auto op = face::op<SequenceForwardSig>("lowrank_lstm_sequence_forward");
  const bool save = face::wants_grad({&x, &h, &c, &w_ih_u, &w_ih_v, &w_hh_u, &w_hh_v}, bias);
  auto [out, h_n, c_n, gates, cells] = op.call(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
  return {out, h_n, c_n};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amnets, m) {
  const std::vector<at::Tag> layout{at::Tag::needs_contiguous_strides};
  // One step: x (B, D), h and c (B, H) -> (h1, c1); W_ih = w_ih_u @ w_ih_v, W_hh = w_hh_u @ w_hh_v.
  m.def("lowrank_lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, "
        "Tensor w_hh_v, Tensor? bias=None) -> (Tensor, Tensor)");
  // (h1, c1, gates); gates = post-activation i,f,g,o (B, 4H) in the accumulation dtype when save.
  m.def("lowrank_lstm_cell_forward(Tensor x, Tensor h, Tensor c, Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, "
        "Tensor w_hh_v, Tensor? bias, bool save) -> (Tensor, Tensor, Tensor)", layout);
  // -> (grad x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
  m.def("lowrank_lstm_cell_backward(Tensor grad_h1, Tensor grad_c1, Tensor x, Tensor h, Tensor c, "
        "Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, Tensor w_hh_v, Tensor c1, Tensor gates) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", layout);
  // All T steps: x (T, B, D), h0/c0 (B, H) or None (zeros) -> (out (T, B, H), h_n, c_n).
  m.def("lowrank_lstm_sequence(Tensor x, Tensor? h0, Tensor? c0, Tensor w_ih_u, Tensor w_ih_v, "
        "Tensor w_hh_u, Tensor w_hh_v, Tensor? bias=None) -> (Tensor, Tensor, Tensor)");
  // (out, h_n, c_n, gates (T,B,4H), cells (T,B,H)); the last two only when save.
  m.def("lowrank_lstm_sequence_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih_u, Tensor w_ih_v, "
        "Tensor w_hh_u, Tensor w_hh_v, Tensor? bias, bool save) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        layout);
  m.def("lowrank_lstm_sequence_backward(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
        "Tensor c0, Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, Tensor w_hh_v, Tensor out, Tensor gates, "
        "Tensor cells) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", layout);
}

TORCH_LIBRARY_IMPL(amnets, CompositeImplicitAutograd, m) {
  m.impl("lowrank_lstm_cell", &lowrank_lstm_cell);
  m.impl("lowrank_lstm_sequence", &lowrank_lstm_sequence);
}

TORCH_LIBRARY_IMPL(amnets, Autograd, m) {
  m.impl("lowrank_lstm_cell_forward", &cell_forward_autograd);
  m.impl("lowrank_lstm_cell_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("lowrank_lstm_sequence_forward", &sequence_forward_autograd);
  m.impl("lowrank_lstm_sequence_backward", torch::autograd::autogradNotImplementedFallback());
}

#define AMNETS_LOWRANK_ROUTES(m)                                   \
  m.impl("lowrank_lstm_cell_forward", &cell_forward);              \
  m.impl("lowrank_lstm_cell_backward", &cell_backward);            \
  m.impl("lowrank_lstm_sequence_forward", &sequence_forward);      \
  m.impl("lowrank_lstm_sequence_backward", &sequence_backward);

TORCH_LIBRARY_IMPL(amnets, CPU, m) { AMNETS_LOWRANK_ROUTES(m) }
TORCH_LIBRARY_IMPL(amnets, CUDA, m) { AMNETS_LOWRANK_ROUTES(m) }

}  // namespace amnets
