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
// Part of the Python module only (examples/deploy builds the other sources without AMNETS_PYTHON_MODULE).
#ifdef AMNETS_PYTHON_MODULE
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../face.h"
#include "../fast_call.h"
#include "../sources_snapshot.h"
#include "lstm_stack.h"

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
            int64_t hidden, const SourcesSnapshot* sources)
      : step_(step), op_(op), weights_(std::move(weights)), hidden_(hidden), sources_(sources) {
    for (auto& b : biases) biases_.push_back(std::move(b));
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
    for (const std::optional<Tensor> b : biases_) wants = wants || (b.has_value() && b->requires_grad());
    return wants;
  }

  StackStep* step_;
  face::Op op_;
  std::vector<Tensor> weights_;
  c10::List<std::optional<Tensor>> biases_;
  int64_t hidden_;
  const SourcesSnapshot* sources_;  // owned by the Python object the function holds (fast_call.h)
};

}  // namespace

// _C.StackCall(kind, weights, biases, hidden_size, snapshot): the function for forward, kind "lowrank" (weights:
// four factors a layer, the op lowrank_lstm_sequence's face) or "sparse" (values, crow_indices, col_indices a
// layer; bsr_linear's face); biases one a layer (None: none). The snapshot covers every tensor the weights come
// from (amnets_kernels/nn/stacked_lstm.py).
void bind_lstm_stack(pybind11::module_& m) {
  m.def("StackCall", [](const std::string& kind, std::vector<Tensor> weights, std::vector<std::optional<Tensor>> biases,
                        int64_t hidden, const pybind11::object& snapshot) {
    TORCH_CHECK_VALUE(kind == "lowrank" || kind == "sparse", "StackCall: kind must be 'lowrank' or 'sparse'; got '",
                      kind, "'");
    const auto* sources = &snapshot.cast<const SourcesSnapshot&>();  // a TypeError for anything else
    const bool lowrank = kind == "lowrank";
    return fast_function(std::make_unique<StackCall>(lowrank ? &lowrank_lstm_stack_step : &bsr_lstm_stack_step,
                                                     lowrank ? face::Op::LowrankLstmSequence : face::Op::BsrLinear,
                                                     std::move(weights), std::move(biases), hidden, sources),
                         snapshot);
  });
}

}  // namespace amnets::cpu
#endif
