// One frame through a whole stack of unidirectional LSTM layers, for inference on the CPU: a swapped
// LowRankLSTM or BlockSparseLSTM streamed one frame a call (amnets_kernels/nn/stacked_lstm.py). Per layer
// its op's fused step (the low-rank lean step, the block-sparse fused cell); the stack in one call because at
// streaming sizes a layer's arithmetic is a few microseconds and a Python op call per layer cost as much again
// (a LowRankLSTM 240->192 x2 stepped: ~62 us, of which two op calls ~33).
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"

namespace amnets::cpu {

// x (B, D); h0 (L, B, R), c0 (L, B, H) or absent (zeros); `weights` holds `count` tensors per layer (`what` says
// so, as "<argument> must hold <them>"), `biases` one per layer (None: no bias) -> (out (B, R), h_n (L, B, R), c_n
// (L, B, H)); out is the last layer's h and never aliases h_n. R, the width of h, is H, or nn.LSTM's proj_size P
// with a projection. step(input, h, c, layer's weights, layer's bias) -> (h1, c1) runs a layer (checking its
// weights and the shapes of what it is given); layer k + 1 reads layer k's h1.
template <typename Step>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_stack_step(const char* op, const at::Tensor& x,
                                                               const std::optional<at::Tensor>& h0,
                                                               const std::optional<at::Tensor>& c0,
                                                               at::TensorList weights, int64_t count, const char* what,
                                                               const c10::List<std::optional<at::Tensor>>& biases,
                                                               int64_t hidden, int64_t rec, const Step& step) {
  const auto layers = static_cast<int64_t>(biases.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == count * layers, op, ": ", what, " for each of the ", layers,
                    " layers that biases has; got ", weights.size(), " tensors");
  checks::dims(op, "x", x, 2);
  TORCH_CHECK_VALUE(layers >= 1 && hidden >= 1, op, ": needs at least one layer (biases has an entry per layer) and ",
                    "hidden_size >= 1; got ", layers, " layers, hidden_size ", hidden);
  const int64_t batch = x.size(0);
  const std::vector<int64_t> h_sizes{layers, batch, rec}, c_sizes{layers, batch, hidden};
  for (const auto& [name, t, sizes] : {std::tuple{"h0", &h0, &h_sizes}, std::tuple{"c0", &c0, &c_sizes}}) {
    if (!t->has_value()) continue;
    checks::shape(op, name, **t, *sizes,
                  rec != hidden && t == &h0 ? "(num_layers, B, proj_size) = " : "(num_layers, B, hidden_size) = ");
    checks::like(op, "x", x, name, **t, true);
  }
  at::Tensor h_n = at::empty(h_sizes, x.options()), c_n = at::empty(c_sizes, x.options());
  const at::Tensor h_zeros = h0.has_value() ? at::Tensor() : at::zeros({batch, rec}, x.options());
  const at::Tensor c_zeros = c0.has_value() ? at::Tensor() : at::zeros({batch, hidden}, x.options());
  const int64_t h_bytes = batch * rec * static_cast<int64_t>(x.element_size());
  const int64_t c_bytes = batch * hidden * static_cast<int64_t>(x.element_size());
  at::Tensor input = x;
  for (int64_t k = 0; k < layers; ++k) {
    auto [h1_, c1_] = step(input, h0.has_value() ? h0->select(0, k) : h_zeros,
                           c0.has_value() ? c0->select(0, k) : c_zeros, weights.data() + count * k, biases.get(k));
    const at::Tensor h1 = h1_.contiguous(), c1 = c1_.contiguous();
    // A step hands back (B, R) and (B, H) in x's dtype, having checked h and c against its weights (copied by
    // bytes next).
    TORCH_INTERNAL_ASSERT(h1.numel() * h1.element_size() == h_bytes && c1.numel() * c1.element_size() == c_bytes);
    std::memcpy(static_cast<char*>(h_n.data_ptr()) + k * h_bytes, h1.data_ptr(), h_bytes);
    std::memcpy(static_cast<char*>(c_n.data_ptr()) + k * c_bytes, c1.data_ptr(), c_bytes);
    input = h1;
  }
  return {input, h_n, c_n};
}

// Whether a stack's weights hold `count` tensors a layer plus nn.LSTM's projection w_hr (P, H) as the last one of
// each (then P, the width of h, checked >= 1), or `count` (then h is hidden wide): {projected, width of h}.
inline std::pair<bool, int64_t> stack_projection(const char* op, at::TensorList weights, int64_t layers, int64_t count,
                                                 int64_t hidden) {
  const bool projected = layers >= 1 && static_cast<int64_t>(weights.size()) == (count + 1) * layers;
  if (!projected) return {false, hidden};
  const at::Tensor& w_hr = weights[count];
  checks::dims(op, "w_hr", w_hr, 2);
  TORCH_CHECK_VALUE(w_hr.size(0) >= 1, op, ": w_hr must have shape (proj_size, H) with proj_size >= 1; got ",
                    checks::py_shape(w_hr.sizes()));
  return {true, w_hr.size(0)};
}

// The two ops' stack steps (amnets_native::lowrank_lstm_stack_step, bsr_lstm_stack_step; schemas in csrc/ops.cpp),
// also called without the dispatcher by the prepared stack call for Python (csrc/cpu/lstm_stack.cpp).
using StackStep = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& x, const std::optional<at::Tensor>& h0,
                                                                 const std::optional<at::Tensor>& c0,
                                                                 at::TensorList weights,
                                                                 const c10::List<std::optional<at::Tensor>>& biases,
                                                                 int64_t hidden);
StackStep lowrank_lstm_stack_step;  // csrc/cpu/lowrank_lstm.cpp
StackStep bsr_lstm_stack_step;      // csrc/cpu/bsr.cpp

}  // namespace amnets::cpu
