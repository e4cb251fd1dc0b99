// amnets_kernels._C.GraphCall: the call of a chunk of the Triton frame engine captured as a CUDA graph
// (amnets_kernels/triton/frame_engine.py, _Chunk) as one native call: x into the chunk's input buffer, the graph
// replayed, its output and decisions copied out into new tensors. From Python these were four ATen calls
// (copy_, CUDAGraph.replay, two clones), each a trip through the binding layer, around a B=1 frame whose kernels
// take 10-60 us. Output and decisions lie in one byte buffer, so they come out in one copy (two views of it).
// The object owns its graph (an at::cuda::CUDAGraph captured between begin() and end() on the current stream, as
// torch.cuda.graph captures), so no graph handle crosses into Python and no argument can make it launch what is not
// there. Compiled in CUDA builds only (csrc/cuda).
#ifdef AMNETS_PYTHON_MODULE
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <memory>
#include <utility>

#include "../fast_call.h"

namespace amnets::cuda {
namespace {

using at::Tensor;

class GraphCall {
 public:
  // x: the buffer the graph reads x from; out, decisions: the tensors it leaves its results in, views of
  // `results`, a whole contiguous uint8 storage of a multiple of 8 bytes (any element type views it).
  GraphCall(Tensor x, Tensor results, Tensor out, Tensor decisions)
      : x_(std::move(x)), results_(std::move(results)), out_(std::move(out)), decisions_(std::move(decisions)) {
    for (const Tensor* t : {&x_, &results_, &out_, &decisions_})
      TORCH_CHECK_VALUE(t->is_cuda() && t->device() == x_.device(),
                        "GraphCall: x, results, out and decisions must be CUDA tensors on one device");
    const int64_t bytes = results_.numel();
    TORCH_CHECK_VALUE(results_.scalar_type() == at::kByte && results_.dim() == 1 && results_.is_contiguous() &&
                          results_.storage_offset() == 0 && bytes == int64_t(results_.storage().nbytes()) &&
                          bytes % 8 == 0,
                      "GraphCall: results must be a whole uint8 storage of a multiple of 8 bytes");
    for (const Tensor* t : {&out_, &decisions_}) {
      int64_t last = t->storage_offset();  // the furthest element, in elements of t's type
      for (int64_t d = 0; d < t->dim(); ++d) last += (t->size(d) - 1) * t->stride(d);
      TORCH_CHECK_VALUE(t->storage().is_alias_of(results_.storage()) && t->numel() > 0 && t->storage_offset() >= 0 &&
                            (last + 1) * int64_t(t->element_size()) <= bytes,
                        "GraphCall: out and decisions must be non-empty views of results");
    }
  }

  // Capture begins on the current stream (not the default one: torch's rule), thread-local, so other threads'
  // CUDA calls meanwhile are theirs; the launches between begin() and end() are the graph.
  void begin() {
    TORCH_CHECK(state_ == State::kNew, "GraphCall: begin() comes once, first");
    c10::cuda::CUDAGuard device(x_.device());
    state_ = State::kBroken;  // until the capture has begun
    graph_ = std::make_unique<at::cuda::CUDAGraph>();  // here, not in the constructor: it needs a CUDA device
    graph_->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    state_ = State::kCapturing;
  }

  void end() {
    TORCH_CHECK(state_ == State::kCapturing, "GraphCall: end() comes after begin()");
    c10::cuda::CUDAGuard device(x_.device());
    state_ = State::kBroken;  // until the graph is instantiated
    graph_->capture_end();
    state_ = State::kCaptured;
  }

  bool captured() const { return state_ == State::kCaptured; }

  // (x) -> (out, decisions): x must match the input buffer (shape, dtype, device); the copies are the caller's.
  pybind11::object operator()(PyObject* const* args) {
    TORCH_CHECK(state_ == State::kCaptured, "GraphCall: called before its graph was captured (begin(), the "
                "launches, end())");
    TORCH_CHECK_TYPE(THPVariable_Check(args[0]), "GraphCall: x must be a tensor");
    const Tensor& x = THPVariable_Unpack(args[0]);
    TORCH_CHECK_VALUE(x.sizes() == x_.sizes() && x.scalar_type() == x_.scalar_type() && x.device() == x_.device(),
                      "GraphCall: x must have shape ", x_.sizes(), ", dtype ", x_.scalar_type(), ", on ",
                      x_.device(), "; got ", x.sizes(), ", ", x.scalar_type(), ", on ", x.device());
    Tensor out, decisions;
    WithoutGil()([&] {
      at::NoGradGuard no_grad;  // the graph computes no gradient: an x that wants one must not make x_ record it
      c10::cuda::CUDAGuard device(x_.device());
      x_.copy_(x);
      graph_->replay();
      const Tensor copy = results_.clone();  // one copy out; its views as out_ and decisions_ lie in results_
      out = copy.view(out_.scalar_type()).as_strided(out_.sizes(), out_.strides(), out_.storage_offset());
      decisions = copy.view(decisions_.scalar_type())
                      .as_strided(decisions_.sizes(), decisions_.strides(), decisions_.storage_offset());
    });
    return pybind11::make_tuple(std::move(out), std::move(decisions));
  }

 private:
  enum class State { kNew, kCapturing, kCaptured, kBroken };
  Tensor x_, results_, out_, decisions_;
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  State state_ = State::kNew;
};

// GraphCall's call as a builtin function (fast_call.h); the function keeps the GraphCall alive.
struct Replay {
  static constexpr const char* kName = "amnets.GraphCall";
  static constexpr const char* kDoc = "A captured chunk of the Triton frame engine: (x) -> (out, decisions)";
  static constexpr int kArity = 1;
  std::shared_ptr<GraphCall> call;
  pybind11::object operator()(PyObject* const* args) const { return (*call)(args); }
};

}  // namespace

void bind_graph_call(pybind11::module_& m) {
  pybind11::class_<GraphCall, std::shared_ptr<GraphCall>>(m, "GraphCall")
      .def(pybind11::init<Tensor, Tensor, Tensor, Tensor>())
      .def("begin", &GraphCall::begin)
      .def("end", &GraphCall::end)
      .def("function", [](std::shared_ptr<GraphCall> self) {
        TORCH_CHECK(self->captured(), "GraphCall: function() comes after end()");
        return fast_function(std::make_unique<Replay>(Replay{std::move(self)}), pybind11::none());
      });
}

}  // namespace amnets::cuda
#endif  // AMNETS_PYTHON_MODULE
