// _C.StackCall: a swapped LowRankLSTM or BlockSparseLSTM stepped one frame a call, from forward's own
// arguments to the whole-stack step (lstm_stack.h) in one native call (amnets_kernels/nn/stacked_lstm.py
// keeps one per module once its native stack step has run). The Python around the op cost about what the
// step does: of ~50 us a frame (240 -> 192 x 2, one AMD EPYC core), nn.LSTM's argument checks, layouts,
// gathering the tensors, the eager-inference and face checks ~25, the dispatcher boxing the tensor lists ~5.
// Returns None wherever forward's Python path must decide, which then runs as before (and raises in its words):
//   the module's tensors changed since the call was made (replaced, re-pointed, a pattern written in place:
//   the SourcesSnapshot it holds), or the backend no longer picks the cpu face;
//   autograd wanted, autocast on, a dispatch or torch-function mode active;
//   input or hx not plain CPU tensors (a subclass, a functorch wrapper, a PackedSequence), or shaped otherwise
//   than one frame; anything the step refuses (ValueError, TypeError).
// Up to kMaxDotBatch rows of fp32 or bf16 weights it runs each layer's lean step straight into h_n / c_n (the
// low-rank lean step, or the block-sparse fused cell's arithmetic), with none of the step ops' per-layer checks,
// views and allocations: the weights were checked when the call was made (after a stack step ran on them), and
// the snapshot keeps them so (a block-sparse pattern is held as a checked copy).
// Part of the Python module only (examples/deploy builds the other sources without AMNETS_PYTHON_MODULE).
#ifdef AMNETS_PYTHON_MODULE
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../face.h"
#include "../fast_call.h"
#include "../sources_snapshot.h"
#include "kernels.h"
#include "lstm_stack.h"
#include "simd.h"

namespace amnets::cpu {
namespace {

using at::Tensor;

// A plain torch.Tensor (not a subclass, a Parameter or a functorch wrapper) on the CPU, or nullptr.
const Tensor* plain_cpu(PyObject* object) {
  if (!THPVariable_CheckExact(object)) return nullptr;
  const Tensor& t = THPVariable_Unpack(object);
  const bool plain = t.has_storage() && t.is_cpu() && t.layout() == at::kStrided &&
                     !t.unsafeGetTensorImpl()->is_python_dispatch();
  return plain ? &t : nullptr;
}

// Whether a mode or autocast could want the ops the Python path calls, not this kernel.
bool intercepted() {
  return c10::impl::TorchDispatchModeTLS::stack_len() > 0 || at::impl::torch_function_mode_enabled() ||
         !c10::impl::tls_local_dispatch_key_set().excluded_.isSupersetOf(c10::autocast_dispatch_keyset);
}

class StackCall {
 public:
  static constexpr const char* kName = "amnets.StackCall";
  static constexpr const char* kDoc = "A stacked LSTM's forward(input, hx) of one frame in one native call, or None";
  static constexpr int kArity = 3;  // (input, hx, batch_first)

  StackCall(StackStep* step, face::Op op, std::vector<Tensor> weights, std::vector<std::optional<Tensor>> biases,
            int64_t hidden, int64_t input_size, const SourcesSnapshot* sources)
      : step_(step), op_(op), weights_(std::move(weights)), bias_list_(biases), hidden_(hidden),
        input_size_(input_size), sources_(sources) {
    for (auto& b : biases) biases_.push_back(std::move(b));
    lean_ = op == face::Op::LowrankLstmSequence ? lean_lowrank() : lean_sparse();
  }

  pybind11::object operator()(PyObject* const* args) const {
    const pybind11::object skip = pybind11::none();
    const Tensor* input = plain_cpu(args[0]);
    const int batch_first = PyObject_IsTrue(args[2]);
    if (batch_first < 0) return PyErr_Clear(), skip;
    if (input == nullptr || intercepted() || !(input->dim() == 2 || input->dim() == 3)) return skip;
    const bool unbatched = input->dim() == 2;  // (1, D); batched (1, B, D), batch_first (B, 1, D)
    const int64_t time = batch_first && !unbatched ? 1 : 0;
    if (input->size(time) != 1) return skip;
    const Tensor x = unbatched ? *input : input->select(time, 0);
    // The module's input_size: the block-sparse step takes D from x (any D its pattern fits), so a frame of
    // another width ran on silently; forward's Python path refuses it in the module's words.
    if (x.size(-1) != input_size_) return skip;
    std::optional<Tensor> h0, c0;
    if (args[1] != Py_None) {
      const bool pair = (PyTuple_Check(args[1]) && PyTuple_GET_SIZE(args[1]) == 2) ||
                        (PyList_Check(args[1]) && PyList_GET_SIZE(args[1]) == 2);
      if (!pair) return skip;
      const bool tuple = PyTuple_Check(args[1]);
      const Tensor* h = plain_cpu(tuple ? PyTuple_GET_ITEM(args[1], 0) : PyList_GET_ITEM(args[1], 0));
      const Tensor* c = plain_cpu(tuple ? PyTuple_GET_ITEM(args[1], 1) : PyList_GET_ITEM(args[1], 1));
      if (h == nullptr || c == nullptr || h->dim() != input->dim() || c->dim() != input->dim()) return skip;
      h0 = unbatched ? h->unsqueeze(1) : *h, c0 = unbatched ? c->unsqueeze(1) : *c;
    }
    if (wants_grad(x, h0, c0) || !sources_->matches() || !face::native(op_, x)) return skip;
    try {
      Tensor out, h_n, c_n;
      if (lean_ && lean_frame(x, h0, c0)) {  // the shapes forward returns, written in place
        const int64_t batch = x.size(0), layers = static_cast<int64_t>(bias_list_.size());
        out = at::empty(unbatched ? at::IntArrayRef{1, rec_}
                        : time == 0 ? at::IntArrayRef{1, batch, rec_} : at::IntArrayRef{batch, 1, rec_},
                        x.options());
        h_n = at::empty(unbatched ? at::IntArrayRef{layers, rec_} : at::IntArrayRef{layers, batch, rec_},
                        x.options());
        c_n = at::empty(unbatched ? at::IntArrayRef{layers, hidden_} : at::IntArrayRef{layers, batch, hidden_},
                        x.options());
        WithoutGil()([&] { lean_step(x, h0, c0, out, h_n, c_n); });
        return pybind11::make_tuple(out, pybind11::make_tuple(h_n, c_n));
      }
      WithoutGil()([&] { std::tie(out, h_n, c_n) = step_(x, h0, c0, weights_, biases_, hidden_); });
      if (unbatched) return pybind11::make_tuple(out, pybind11::make_tuple(h_n.squeeze(1), c_n.squeeze(1)));
      return pybind11::make_tuple(out.unsqueeze(time), pybind11::make_tuple(h_n, c_n));
    } catch (const c10::ValueError&) {
      return skip;
    } catch (const c10::TypeError&) {
      return skip;
    }
  }

 private:
  // Whether autograd would record this step (then the Python path builds the graph).
  bool wants_grad(const Tensor& x, const std::optional<Tensor>& h0, const std::optional<Tensor>& c0) const {
    if (!at::GradMode::is_enabled()) return false;
    bool wants = x.requires_grad() || (h0.has_value() && h0->requires_grad()) || (c0.has_value() && c0->requires_grad());
    for (const Tensor& w : weights_) wants = wants || w.requires_grad();
    for (const std::optional<Tensor>& b : bias_list_) wants = wants || (b.has_value() && b->requires_grad());
    return wants;
  }

  // Whether every layer takes the lean step as it is, decided once: the snapshot keeps the tensors so. (They have
  // passed the op's checks already: the call is made after a stack step ran on them.)
  // Low-rank: contiguous factors of one dtype the lean step runs, shapes that chain; five tensors a layer with
  // nn.LSTM's projection (w_hr (P, H) last: h is P wide).
  bool lean_lowrank() {
    const auto layers = static_cast<int64_t>(bias_list_.size());
    if (layers < 1 || weights_.size() % layers != 0) return false;
    count_ = static_cast<int64_t>(weights_.size()) / layers;
    if (count_ != 4 && (count_ != 5 || weights_[4].dim() != 2)) return false;
    rec_ = count_ == 5 ? weights_[4].size(0) : hidden_;
    dtype_ = weights_[0].scalar_type();
    if (!(dtype_ == at::kFloat || (dtype_ == at::kBFloat16 && simd::has_dpbf16()))) return false;
    const auto fits = [&](const Tensor& t, std::initializer_list<int64_t> sizes) {
      return t.scalar_type() == dtype_ && t.is_contiguous() && t.sizes().equals(sizes);
    };
    for (int64_t k = 0; k < layers; ++k) {
      const Tensor* w = weights_.data() + count_ * k;
      const int64_t r_ih = w[1].dim() == 2 ? w[1].size(0) : -1, r_hh = w[3].dim() == 2 ? w[3].size(0) : -1;
      const int64_t d = k == 0 ? input_size_ : rec_, gates = 4 * hidden_;
      if (!(fits(w[0], {gates, r_ih}) && fits(w[1], {r_ih, d}) && fits(w[2], {gates, r_hh}) &&
            fits(w[3], {r_hh, rec_}) && (count_ == 4 || fits(w[4], {rec_, hidden_}))))
        return false;
      if (bias_list_[k].has_value() && !fits(*bias_list_[k], {gates})) return false;
    }
    return true;
  }

  // Block-sparse: every layer's blocks have a fast kernel (bsr_lstm_layer checks them, the pattern as a copy); four
  // tensors a layer with nn.LSTM's projection (w_hr (P, H) last: h is P wide).
  bool lean_sparse() {
    const auto layers = static_cast<int64_t>(bias_list_.size());
    if (layers < 1 || weights_.size() % layers != 0) return false;
    count_ = static_cast<int64_t>(weights_.size()) / layers;
    if (count_ != 3 && (count_ != 4 || weights_[3].dim() != 2)) return false;
    rec_ = count_ == 4 ? weights_[3].size(0) : hidden_;
    dtype_ = weights_[0].scalar_type();
    try {
      for (int64_t k = 0; k < layers; ++k) {
        const Tensor* w = weights_.data() + count_ * k;
        sparse_.push_back(bsr_lstm_layer(w[0], w[1], w[2], bias_list_[k], k == 0 ? input_size_ : rec_, hidden_,
                                         count_ == 4 ? w + 3 : nullptr));
      }
    } catch (const c10::Error&) {
      sparse_.clear();
      return false;
    }
    return true;
  }

  // Whether this frame takes the lean step: x (B, input_size) in the factors' dtype, 1 <= B <= kMaxDotBatch,
  // h0 (L, B, R) and c0 (L, B, H) (where given) contiguous, of that dtype.
  bool lean_frame(const Tensor& x, const std::optional<Tensor>& h0, const std::optional<Tensor>& c0) const {
    const int64_t batch = x.size(0), layers = static_cast<int64_t>(bias_list_.size());
    bool lean = x.scalar_type() == dtype_ && x.size(1) == input_size_ && batch >= 1 && batch <= kMaxDotBatch &&
                x.is_contiguous();
    for (const auto& [t, width] : {std::pair{&h0, rec_}, std::pair{&c0, hidden_}}) {
      lean = lean && (!t->has_value() || ((*t)->scalar_type() == dtype_ && (*t)->is_contiguous() &&
                                          (*t)->sizes().equals({layers, batch, width})));
    }
    return lean;
  }

  // The stack, layer by layer the lean step (kernels.h: the low-rank one, or the block-sparse fused cell's) writing
  // into h_n and c_n; out is the last layer's h.
  void lean_step(const Tensor& x, const std::optional<Tensor>& h0, const std::optional<Tensor>& c0, Tensor& out,
                 Tensor& h_n, Tensor& c_n) const {
    const int64_t batch = x.size(0), element = static_cast<int64_t>(x.element_size());
    const int64_t h_bytes = batch * rec_ * element, c_bytes = batch * hidden_ * element;
    char *hn = static_cast<char*>(h_n.data_ptr()), *cn = static_cast<char*>(c_n.data_ptr());
    const char* h = h0.has_value() ? static_cast<const char*>(h0->data_ptr()) : nullptr;
    const char* c = c0.has_value() ? static_cast<const char*>(c0->data_ptr()) : nullptr;
    thread_local std::vector<float> work;
    const void* in = x.data_ptr();
    for (size_t k = 0; k < bias_list_.size(); ++k) {
      const int64_t at_h = static_cast<int64_t>(k) * h_bytes, at_c = static_cast<int64_t>(k) * c_bytes;
      const char *hk = h != nullptr ? h + at_h : nullptr, *ck = c != nullptr ? c + at_c : nullptr;
      if (sparse_.empty()) {
        const Tensor* w = weights_.data() + count_ * k;
        const LowrankStep step = lowrank_step_of(w[0], w[1], w[2], w[3], bias_list_[k], count_ == 5 ? w + 4 : nullptr);
        work.resize(std::max<size_t>(work.size(), lean_work_floats(step, batch)));
        lean_step_into(step, batch, in, hk, ck, hn + at_h, cn + at_c, work.data());
      } else {
        work.resize(std::max<size_t>(work.size(), bsr_step_work_floats(sparse_[k], batch)));
        bsr_step_into(sparse_[k], batch, in, hk, ck, hn + at_h, cn + at_c, work.data());
      }
      in = hn + at_h;
    }
    std::memcpy(out.data_ptr(), in, h_bytes);
  }

  StackStep* step_;
  face::Op op_;
  std::vector<Tensor> weights_;
  std::vector<std::optional<Tensor>> bias_list_;  // (read without c10::List's per-element copies)
  c10::List<std::optional<Tensor>> biases_;
  int64_t hidden_, input_size_;
  int64_t rec_ = hidden_;  // the width of h: nn.LSTM's proj_size with a projection, else hidden_
  int64_t count_ = 4;      // tensors a layer: low-rank 4 (5 projected), block-sparse 3 (4 projected)
  const SourcesSnapshot* sources_;  // owned by the Python object the function holds (fast_call.h)
  std::vector<BsrLstmLayer> sparse_;  // a block-sparse stack taking the lean step: each layer, checked
  bool lean_ = false;
  at::ScalarType dtype_ = at::kFloat;
};

}  // namespace

// _C.StackCall(kind, weights, biases, hidden_size, input_size, snapshot): the function for forward, kind
// "lowrank" (weights: four factors a layer, five with nn.LSTM's projection w_hr; the op lowrank_lstm_sequence's
// face) or "sparse" (values, crow_indices, col_indices a layer, and w_hr with a projection; bsr_linear's face);
// biases one a layer (None: none).
// The snapshot covers every tensor the weights come from (amnets_kernels/nn/stacked_lstm.py).
void bind_lstm_stack(pybind11::module_& m) {
  m.def("StackCall", [](const std::string& kind, std::vector<Tensor> weights, std::vector<std::optional<Tensor>> biases,
                        int64_t hidden, int64_t input_size, const pybind11::object& snapshot) {
    TORCH_CHECK_VALUE(kind == "lowrank" || kind == "sparse", "StackCall: kind must be 'lowrank' or 'sparse'; got '",
                      kind, "'");
    const auto* sources = &snapshot.cast<const SourcesSnapshot&>();  // a TypeError for anything else
    const bool lowrank = kind == "lowrank";
    return fast_function(std::make_unique<StackCall>(lowrank ? &lowrank_lstm_stack_step : &bsr_lstm_stack_step,
                                                     lowrank ? face::Op::LowrankLstmSequence : face::Op::BsrLinear,
                                                     std::move(weights), std::move(biases), hidden, input_size,
                                                     sources),
                         snapshot);
  });
}

}  // namespace amnets::cpu
#endif
