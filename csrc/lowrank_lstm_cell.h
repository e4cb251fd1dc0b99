// lowrank_lstm_cell as one step of lowrank_lstm_sequence, instantiated by the cpu and cuda faces with their
// own sequence functions: the cuda face registers these as they are; the cpu face runs a lean streaming
// step of its own for inference (few rows, no save) and these for everything else.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"

namespace amnets {

using LstmGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor>;

// SequenceForward: (x (T, B, D), h0, c0, factors..., bias, save) -> (out, h_n, c_n, gates, cells).
template <auto SequenceForward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_lstm_cell_forward(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih_u,
    const at::Tensor& w_ih_v, const at::Tensor& w_hh_u, const at::Tensor& w_hh_v,
    const c10::optional<at::Tensor>& bias, bool save) {
  auto [out, h1, c1, gates, cells] =
      SequenceForward(x.unsqueeze(0), h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, save);
  return {h1, c1, save ? gates[0] : gates};
}

// SequenceBackward: the sequence op's backward; the cell's output is the sequence's h_n (no grad_out).
template <auto SequenceBackward>
LstmGrads lowrank_lstm_cell_backward(const at::Tensor& grad_h1, const at::Tensor& grad_c1, const at::Tensor& x,
                                     const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih_u,
                                     const at::Tensor& w_ih_v, const at::Tensor& w_hh_u, const at::Tensor& w_hh_v,
                                     const at::Tensor& c1, const at::Tensor& gates) {
  // The cell's own arguments under their own names first: the sequence's checks would name grad_h1's
  // stand-ins (grad_out) and c1 as cells.
  constexpr const char* op = "lowrank_lstm_cell_backward";
  const int64_t hidden = checks::lowrank_lstm(op, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c10::nullopt, false);
  for (const auto& [name, t] : {std::pair{"grad_h1", &grad_h1}, {"grad_c1", &grad_c1}, {"c1", &c1}})
    checks::saved(op, name, *t, h.sizes());
  checks::saved(op, "gates", gates, {x.size(0), 4 * hidden});
  for (const auto& [name, t] : {std::pair{"grad_h1", &grad_h1}, {"grad_c1", &grad_c1}, {"c1", &c1}, {"gates", &gates}}) {
    checks::floating(op, name, *t);
    checks::like(op, "x", x, name, *t, false);
  }
  LstmGrads g = SequenceBackward(at::zeros_like(grad_h1).unsqueeze(0), grad_h1, grad_c1, x.unsqueeze(0), h, c,
                                 w_ih_u, w_ih_v, w_hh_u, w_hh_v, h.unsqueeze(0), gates.unsqueeze(0),
                                 c1.unsqueeze(0));
  std::get<0>(g) = std::get<0>(g).squeeze(0);
  return g;
}

}  // namespace amnets
