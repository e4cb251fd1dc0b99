// torch.ops.amnets.bsr_linear: the public op, its forward and backward ops, their autograd, and the route
// to a face (csrc/face.h). One call from Python or C++ checks its arguments once (csrc/checks.h), then
// runs the compiled kernel of the tensors' device (csrc/cpu/bsr.cpp, csrc/cuda/bsr.cu) without entering
// Python, or, when the backend asks for it, the Python face op amnets_faces::bsr_linear_<direction>.
// The fake (meta) kernels are in Python (amnets_kernels/_ops/bsr.py): tracing is Python's business, and
// they must work on symbolic shapes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/parallel.h"
#include "face.h"
#include "pattern_cache.h"

namespace amnets {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                          const std::optional<Tensor>&);
using BackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, int64_t, int64_t, bool, bool);

void check_rows(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (M, in_features); got shape ", checks::py_shape(x.sizes()),
                    " (torch.ops.amnets.bsr_linear takes any leading dims)");
}

// Index data on the GPU: read (a device sync) once per pattern, csrc/pattern_cache.h.
void check_device_pattern(const char* op, const Tensor& values, const Tensor& crow, const Tensor& col,
                          int64_t out_features, int64_t in_features) {
  const int64_t nnzb = values.size(0), block = values.size(1);
  pattern::derived("checked", crow, col, {nnzb, block, out_features, in_features}, [&] {
    checks::bsr_pattern(op, nnzb, block, crow.cpu(), col.cpu(), out_features, in_features);
    return std::vector<Tensor>{};
  });
}

// The index data, checked where no kernel will: the cpu kernels read it themselves on every call.
void check_pattern(const char* op, bool native, const Tensor& values, const Tensor& crow, const Tensor& col,
                   int64_t out_features, int64_t in_features) {
  if (crow.is_cpu() && col.is_cpu()) {
    if (!native) checks::bsr_pattern(op, values, crow, col, out_features, in_features);
  } else {
    check_device_pattern(op, values, crow, col, out_features, in_features);
  }
}

// amnets::bsr_linear_forward on CPU and CUDA tensors.
Tensor forward(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, int64_t out_features,
               int64_t in_features, const std::optional<Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  check_rows(op, x);
  checks::bsr_linear_args(op, x, values, crow, col, out_features, in_features, bias);
  const bool native = face::native(face::Op::BsrLinear, x);
  check_pattern(op, native, values, crow, col, out_features, in_features);
  static const face::Route<ForwardSig> route("bsr_linear_forward");
  return route(native, x, values, crow, col, out_features, in_features, bias);
}

// amnets::bsr_linear_backward on CPU and CUDA tensors; called directly, it reads the index data too.
std::tuple<Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& x, const Tensor& values,
                                    const Tensor& crow, const Tensor& col, int64_t out_features,
                                    int64_t in_features, bool need_x, bool need_values) {
  constexpr const char* op = "bsr_linear_backward";
  check_rows(op, x);
  checks::bsr_linear_args(op, x, values, crow, col, out_features, in_features, std::nullopt);
  checks::saved(op, "grad_out", grad_out, {x.size(0), out_features});
  const bool native = face::native(face::Op::BsrLinear, x);
  check_pattern(op, native, values, crow, col, out_features, in_features);
  static const face::Route<BackwardSig> route("bsr_linear_backward");
  return route(native, grad_out, x, values, crow, col, out_features, in_features, need_x, need_values);
}

// d/dx and d/dvalues by amnets::bsr_linear_backward, d/dbias = the column sums of grad_y (in fp32 for
// half types); backward runs under the backend that was in force for the forward.
class BsrLinear : public torch::autograd::Function<BsrLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values, const Tensor& crow,
                        const Tensor& col, int64_t out_features, int64_t in_features,
                        const std::optional<Tensor>& bias) {
    ctx->save_for_backward({x, values, crow, col});
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["backend"] = static_cast<int64_t>(face::current());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<ForwardSig>("bsr_linear_forward");
    return op.call(x, values, crow, col, out_features, in_features, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    face::Scope backend(static_cast<face::Backend>(ctx->saved_data["backend"].toInt()));
    cpu::OpenMpScope openmp;
    const auto saved = ctx->get_saved_variables();
    const Tensor& grad_y = grads[0];
    // Edges: x, values, crow, col, then bias when there is one.
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4);
    Tensor grad_x, grad_values, grad_bias;
    if (need_x || need_values) {
      static const auto op = face::op<BackwardSig>("bsr_linear_backward");
      auto [gx, gv] = op.call(grad_y, saved[0], saved[1], saved[2], saved[3],
                              ctx->saved_data["out_features"].toInt(), ctx->saved_data["in_features"].toInt(),
                              need_x, need_values);
      if (need_x) grad_x = gx;
      if (need_values) grad_values = gv;
    }
    if (need_bias) {
      const auto type = grad_y.scalar_type();
      const bool half = type == at::kHalf || type == at::kBFloat16;
      grad_bias = grad_y.sum(0, false, half ? at::kFloat : type).to(type);
    }
    return {grad_x, grad_values, Tensor(), Tensor(), Tensor(), Tensor(), grad_bias};
  }
};

// bsr_linear_backward as a function of (grad_y, x, values) for double backward (Hessian-vector products,
// gradient penalties). It is bilinear like the forward, so its derivatives are the op's two directions again,
// on the same pattern: with gx = g W and gv = the blocks of gᵀx at W's pattern, and ggx, ggv their incoming
// gradients (GGV: the matrix of ggv's blocks),
//   d/dg = ggx Wᵀ + x GGVᵀ  (forward, twice),   d/dx = g GGV,   d/dvalues = the blocks of gᵀ ggx  (backward).
// Those calls go through the dispatcher, so under create_graph they record a graph in turn (any order).
class BsrLinearBackward : public torch::autograd::Function<BsrLinearBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_y, const Tensor& x, const Tensor& values,
                               const Tensor& crow, const Tensor& col, int64_t out_features, int64_t in_features,
                               bool need_x, bool need_values) {
    ctx->save_for_backward({grad_y, x, values, crow, col});
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["backend"] = static_cast<int64_t>(face::current());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<BackwardSig>("bsr_linear_backward");
    auto [gx, gv] = op.call(grad_y, x, values, crow, col, out_features, in_features, need_x, need_values);
    return {gx, gv};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    face::Scope backend(static_cast<face::Backend>(ctx->saved_data["backend"].toInt()));
    cpu::OpenMpScope openmp;
    const auto saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &x = saved[1], &values = saved[2], &crow = saved[3], &col = saved[4];
    const int64_t out_f = ctx->saved_data["out_features"].toInt(), in_f = ctx->saved_data["in_features"].toInt();
    // An empty output (not asked for) or an unused one brings no gradient.
    const Tensor ggx = grads[0].defined() && grads[0].numel() > 0 ? grads[0] : Tensor();
    const Tensor ggv = grads[1].defined() && grads[1].numel() > 0 ? grads[1] : Tensor();
    static const auto forward_op = face::op<ForwardSig>("bsr_linear_forward");
    static const auto backward_op = face::op<BackwardSig>("bsr_linear_backward");
    Tensor grad_g, grad_x, grad_values;
    if (ctx->needs_input_grad(0)) {
      if (ggx.defined()) grad_g = forward_op.call(ggx, values, crow, col, out_f, in_f, std::nullopt);
      if (ggv.defined()) {
        Tensor term = forward_op.call(x, ggv, crow, col, out_f, in_f, std::nullopt);
        grad_g = grad_g.defined() ? grad_g + term : term;
      }
    }
    if (ctx->needs_input_grad(1) && ggv.defined())
      grad_x = std::get<0>(backward_op.call(g, x, ggv, crow, col, out_f, in_f, true, false));
    if (ctx->needs_input_grad(2) && ggx.defined())
      grad_values = std::get<1>(backward_op.call(g, ggx, values, crow, col, out_f, in_f, false, true));
    return {grad_g, grad_x, grad_values, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> backward_autograd(const Tensor& grad_y, const Tensor& x, const Tensor& values,
                                             const Tensor& crow, const Tensor& col, int64_t out_features,
                                             int64_t in_features, bool need_x, bool need_values) {
  const bool recorded = at::GradMode::is_enabled() &&
                        (grad_y.requires_grad() || x.requires_grad() || values.requires_grad());
  if (!recorded) {  // a first-order backward: straight to the kernel
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<BackwardSig>("bsr_linear_backward");
    return op.call(grad_y, x, values, crow, col, out_features, in_features, need_x, need_values);
  }
  auto outputs = BsrLinearBackward::apply(grad_y, x, values, crow, col, out_features, in_features, need_x,
                                          need_values);
  return {outputs[0], outputs[1]};
}

Tensor forward_autograd(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                        int64_t out_features, int64_t in_features, const std::optional<Tensor>& bias) {
  // A call autograd records alternates with ATen's OpenMP regions (its backward's): its loops run on OpenMP
  // too (csrc/cpu/parallel.h); inference calls run on our pool.
  const bool recorded = at::GradMode::is_enabled() &&
                        (x.requires_grad() || values.requires_grad() || (bias.has_value() && bias->requires_grad()));
  std::optional<cpu::OpenMpScope> openmp;
  if (recorded) openmp.emplace();
  return BsrLinear::apply(x, values, crow, col, out_features, in_features, bias);
}

// checks::py_shape of sizes that may be symbolic (under torch.export).
std::string sym_shape(const Tensor& x) {
  const c10::SymIntArrayRef sizes = x.sym_sizes();
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + c10::str(sizes[i]);
  return text + (sizes.size() == 1 ? ",)" : ")");
}

// amnets::bsr_linear: x (..., in_features) as rows.
Tensor bsr_linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                  int64_t out_features, int64_t in_features, const std::optional<Tensor>& bias) {
  constexpr const char* op = "bsr_linear";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features); got a scalar");
  // Symbolic sizes (sym_sizes, reshape_symint, view_symint): under torch.export with a dynamic batch, x.sizes()
  // would specialise the leading dims to the example's (or fail on a symbolic size).
  TORCH_CHECK_VALUE(in_features >= 1 && x.sym_size(-1) == in_features, op, ": x.shape[-1] must equal in_features = ",
                    in_features, "; got x of shape ", sym_shape(x));
  static const auto op_forward = face::op<ForwardSig>("bsr_linear_forward");
  // Rows already: no reshaping views (two tensors a call, the most of this layer's host cost).
  if (x.dim() == 2) return op_forward.call(x, values, crow, col, out_features, in_features, bias);
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = out_features;
  const std::vector<c10::SymInt> rows{-1, in_features};
  return op_forward.call(x.reshape_symint(rows), values, crow, col, out_features, in_features, bias)
      .view_symint(shape);
}

}  // namespace

// Inductor hands these ops contiguous inputs (the faces want them) instead of asserting traced strides.
TORCH_LIBRARY_FRAGMENT(amnets, m) {
  const std::vector<at::Tag> layout{at::Tag::needs_contiguous_strides};
  // y = x @ W^T + bias for x (..., in_features), W given as BSR blocks; differentiable in x, values, bias.
  m.def("bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, int out_features, "
        "int in_features, Tensor? bias=None) -> Tensor");
  // The same for x (M, in_features): the op autograd is registered on.
  m.def("bsr_linear_forward(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "int out_features, int in_features, Tensor? bias) -> Tensor", layout);
  // (grad_x or an empty tensor, grad_values or an empty tensor), as need_x / need_values ask.
  m.def("bsr_linear_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, int out_features, int in_features, bool need_x, bool need_values) "
        "-> (Tensor, Tensor)", layout);
}

TORCH_LIBRARY_IMPL(amnets, CompositeImplicitAutograd, m) { m.impl("bsr_linear", &bsr_linear); }

TORCH_LIBRARY_IMPL(amnets, Autograd, m) {
  m.impl("bsr_linear_forward", &forward_autograd);
  m.impl("bsr_linear_backward", &backward_autograd);
}

TORCH_LIBRARY_IMPL(amnets, CPU, m) {
  m.impl("bsr_linear_forward", &forward);
  m.impl("bsr_linear_backward", &backward);
}

TORCH_LIBRARY_IMPL(amnets, CUDA, m) {
  m.impl("bsr_linear_forward", &forward);
  m.impl("bsr_linear_backward", &backward);
}

}  // namespace amnets
