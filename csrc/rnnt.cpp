// torch.ops.amnets.rnnt_loss and fused_joint_rnnt_loss: the public ops, their forward and backward ops, their
// autograd and the route to a face (csrc/face.h), as csrc/bsr.cpp does for bsr_linear. The kernels are the
// faces' (csrc/cpu/rnnt.cpp, csrc/cuda/rnnt.cu, amnets_faces::*); the fake kernels are in Python
// (amnets_kernels/_ops/rnnt.py).
//
// Host syncs: none on CUDA tensors by default. The labels and lengths are checked where the mode of
// face::label_checks (csrc/face.h) says: on the host (a ValueError naming the bad value, and a warning for
// non-finite costs; the CPU default) or on the device (bad sequences get a NaN cost and a zero gradient;
// the CUDA default, which never waits for the GPU). Neither CUDA face waits either (csrc/cuda/rnnt.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "face.h"

namespace amnets {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Bias = std::optional<Tensor>;
using Saved = std::tuple<Tensor, Tensor, Tensor, Tensor>;  // costs, alphas, betas, den

using LossForwardSig = Saved(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double, bool, bool);
using LossBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double, bool);
using JointForwardSig = Saved(const Tensor&, const Tensor&, const Tensor&, const Bias&, const Tensor&, const Tensor&,
                              const Tensor&, int64_t, c10::string_view, double, bool);
using JointBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Bias&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, c10::string_view, double);

// The labels as the faces receive them (int32, on the labels' device) and, under device checks, `bad`: a
// (B,) bool of the sequences whose lengths or labels are out of range (undefined under host checks).
struct Labels {
  Tensor targets, frames, labels, bad;
};

// Host checks: the label data checked value by value (as read, before any narrowing: a bad int64 value must
// not wrap into range). CPU tensors of one dtype are read in place; others through int64 host copies (for
// CUDA tensors, a sync).
Labels host_checked_labels(const char* op, const Tensor& targets, const Tensor& frames, const Tensor& labels,
                           int64_t batch, int64_t steps, int64_t u1, int64_t vocab, int64_t blank) {
  const bool in_place = targets.is_cpu() && frames.is_cpu() && labels.is_cpu() &&
                        frames.scalar_type() == targets.scalar_type() && labels.scalar_type() == targets.scalar_type();
  if (in_place) {
    auto [t, f, l] = checks::rnnt_labels(op, targets, frames, labels, batch, steps, u1, vocab, blank);
    return {t, f, l, Tensor()};
  }
  const auto host = [](const Tensor& t) { return t.to(at::kCPU, at::kLong); };
  checks::rnnt_labels(op, host(targets), host(frames), host(labels), batch, steps, u1, vocab, blank);
  return {targets.to(at::kInt), frames.to(at::kInt), labels.to(at::kInt), Tensor()};
}

// Device checks: torch.ops.amnets_native.rnnt_device_labels, no host read. A bad sequence (lengths out of range, a
// label within its length outside [0, V) or blank) runs the kernels as 1 frame and 0 labels, so nothing is read out
// of bounds; targets are clamped into [0, V) (entries past a good sequence's length are never read, so its result
// is unchanged). The conditions are compared in int64, before narrowing: a bad value must not wrap into range.
// This version, tensor ops on the labels' device, serves every device; the CUDA face registers a kernel that does
// the same in one launch (csrc/cuda/rnnt.cu: these ops' 28 kernels ran twice per fwd+bwd, most of an eager call's 71).
using DeviceLabels = std::tuple<Tensor, Tensor, Tensor, Tensor>;  // targets, frames, labels as int32; bad (B,) bool

DeviceLabels device_labels(const Tensor& targets, const Tensor& frames, const Tensor& labels, int64_t steps,
                           int64_t vocab, int64_t blank, c10::string_view op_name) {
  const std::string op(op_name);
  checks::rnnt_device_labels_args(op.c_str(), targets, frames, labels, steps, vocab, blank);
  const Tensor t = targets.to(at::kLong), f = frames.to(at::kLong), l = labels.to(at::kLong);
  const int64_t max_labels = t.size(1);
  const Tensor within = at::arange(max_labels, t.options()).unsqueeze(0) < l.unsqueeze(1);  // (B, U)
  const Tensor bad = (f < 1) | (f > steps) | (l < 0) | (l > max_labels) |
                     (within & ((t < 0) | (t >= vocab) | (t == blank))).any(1);
  return {t.clamp(0, vocab - 1).to(at::kInt), f.masked_fill(bad, 1).to(at::kInt), l.masked_fill(bad, 0).to(at::kInt),
          bad};
}

using DeviceLabelsSig =
    DeviceLabels(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t, c10::string_view);

// The public ops have checked the labels' shapes against the lattice (checks::rnnt_loss_args / fused_joint_args).
Labels device_checked_labels(const char* op, const Tensor& targets, const Tensor& frames, const Tensor& labels,
                             int64_t /*batch*/, int64_t steps, int64_t /*u1*/, int64_t vocab, int64_t blank) {
  static const auto checked = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("amnets_native::rnnt_device_labels", "")
                                  .typed<DeviceLabelsSig>();
  auto [t, f, l, bad] = checked.call(targets, frames, labels, steps, vocab, blank, op);
  return {t, f, l, bad};
}

Labels checked_labels(const char* op, const Tensor& targets, const Tensor& frames, const Tensor& labels, int64_t batch,
                      int64_t steps, int64_t u1, int64_t vocab, int64_t blank) {
  return (face::label_checks_on_host(targets) ? host_checked_labels : device_checked_labels)(
      op, targets, frames, labels, batch, steps, u1, vocab, blank);
}

bool all_finite(const Tensor& costs) {
  if (!costs.is_cpu()) return at::isfinite(costs).all().item<bool>();  // a sync on CUDA
  const Tensor c = costs.contiguous();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "all_finite", [&] {
    const scalar_t* data = c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) finite = finite && std::isfinite(static_cast<double>(data[i]));
  });
  return finite;
}

// After a forward. Host checks: a non-finite cost gets the Python package's report (a RuntimeWarning saying
// what backward does with it), else a plain warning. Device checks: the bad sequences' costs and log P
// (beta(0, 0), which backward reads) become NaN, on the device; nothing is reported (it would sync).
void finish_forward(const char* op, const Labels& checked, Saved& out) {
  Tensor& costs = std::get<0>(out);
  Tensor& betas = std::get<2>(out);
  if (checked.bad.defined()) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    costs.masked_fill_(checked.bad, nan);
    if (betas.numel()) betas.select(2, 0).select(1, 0).masked_fill_(checked.bad, nan);
    return;
  }
  if (all_finite(costs)) return;
  const auto reporter = c10::Dispatcher::singleton().findSchema({"amnets_faces::report_non_finite", ""});
  if (reporter.has_value()) {
    reporter->typed<void(c10::string_view, const Tensor&, const Tensor&)>().call(op, costs, betas);
  } else {
    TORCH_WARN(op, ": some sequences have a non-finite cost; their gradient is zero");
  }
}

// A NaN clamp compared false everywhere and meant "no clamp", silently.
void check_clamp(const char* op, double clamp) {
  TORCH_CHECK_VALUE(!std::isnan(clamp), op, ": clamp must be a number (<= 0: no clamp); got nan");
}

void check_saved(const char* op, const Tensor& grad_costs, const Tensor& costs, const Tensor& alphas,
                 const Tensor& betas, const Tensor& den, int64_t batch, int64_t steps, int64_t u1) {
  checks::saved(op, "grad_costs", grad_costs, {batch});
  checks::saved(op, "costs", costs, {batch});
  checks::saved(op, "alphas", alphas, {batch, steps, u1});
  checks::saved(op, "betas", betas, {batch, steps, u1});
  checks::saved(op, "den", den, {batch, steps, u1});
}

// ---------------------------------------------------------------------------------------------------
// The routes: checks, then the face.

Saved loss_forward(const Tensor& logits, const Tensor& targets, const Tensor& frames, const Tensor& labels,
                   int64_t blank_in, double clamp, bool fused_log_softmax, bool save) {
  constexpr const char* op = "rnnt_loss";
  const int64_t blank = checks::rnnt_loss_args(op, logits, targets, frames, labels, blank_in);
  check_clamp(op, clamp);
  const Labels checked = checked_labels(op, targets, frames, labels, logits.size(0), logits.size(1), logits.size(2),
                                        logits.size(3), blank);
  static const face::Route<LossForwardSig> route("rnnt_loss_forward");
  Saved out = route(face::native(face::Op::RnntLoss, logits), logits, checked.targets, checked.frames, checked.labels,
                    blank, clamp, fused_log_softmax, save);
  finish_forward(op, checked, out);
  return out;
}

Tensor loss_backward(const Tensor& grad_costs, const Tensor& logits, const Tensor& targets, const Tensor& frames,
                     const Tensor& labels, const Tensor& costs, const Tensor& alphas, const Tensor& betas,
                     const Tensor& den, int64_t blank_in, double clamp, bool fused_log_softmax) {
  constexpr const char* op = "rnnt_loss_backward";
  const int64_t blank = checks::rnnt_loss_args(op, logits, targets, frames, labels, blank_in);
  const int64_t batch = logits.size(0), steps = logits.size(1), u1 = logits.size(2);
  const Labels l = checked_labels(op, targets, frames, labels, batch, steps, u1, logits.size(3), blank);
  check_saved(op, grad_costs, costs, alphas, betas, den, batch, steps, u1);
  static const face::Route<LossBackwardSig> route("rnnt_loss_backward");
  return route(face::native(face::Op::RnntLoss, logits), grad_costs, logits, l.targets, l.frames, l.labels, costs,
               alphas, betas, den, blank, clamp, fused_log_softmax);
}

Saved joint_forward(const Tensor& enc, const Tensor& pred, const Tensor& weight, const Bias& bias,
                    const Tensor& targets, const Tensor& frames, const Tensor& labels, int64_t blank_in,
                    c10::string_view activation, double clamp, bool save) {
  constexpr const char* op = "fused_joint_rnnt_loss";
  const int64_t blank = checks::fused_joint_args(op, enc, pred, weight, bias, targets, frames, labels, blank_in,
                                                 std::string(activation));
  check_clamp(op, clamp);
  const Labels checked = checked_labels(op, targets, frames, labels, enc.size(0), enc.size(1), pred.size(1),
                                        weight.size(0), blank);
  static const face::Route<JointForwardSig> route("fused_joint_rnnt_loss_forward");
  Saved out = route(face::native(face::Op::FusedJointRnntLoss, enc), enc, pred, weight, bias, checked.targets,
                    checked.frames, checked.labels, blank, activation, clamp, save);
  finish_forward(op, checked, out);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> joint_backward(
    const Tensor& grad_costs, const Tensor& enc, const Tensor& pred, const Tensor& weight, const Bias& bias,
    const Tensor& targets, const Tensor& frames, const Tensor& labels, const Tensor& costs, const Tensor& alphas,
    const Tensor& betas, const Tensor& den, int64_t blank_in, c10::string_view activation, double clamp) {
  constexpr const char* op = "fused_joint_rnnt_loss_backward";
  const int64_t blank = checks::fused_joint_args(op, enc, pred, weight, bias, targets, frames, labels, blank_in,
                                                 std::string(activation));
  const int64_t batch = enc.size(0), steps = enc.size(1), u1 = pred.size(1);
  const Labels l = checked_labels(op, targets, frames, labels, batch, steps, u1, weight.size(0), blank);
  check_saved(op, grad_costs, costs, alphas, betas, den, batch, steps, u1);
  static const face::Route<JointBackwardSig> route("fused_joint_rnnt_loss_backward");
  return route(face::native(face::Op::FusedJointRnntLoss, enc), grad_costs, enc, pred, weight, bias, l.targets,
               l.frames, l.labels, costs, alphas, betas, den, blank, activation, clamp);
}

// ---------------------------------------------------------------------------------------------------
// Autograd: the costs are differentiable, the lattice workspace is not; backward runs under the backend
// of the forward.

void remember(AutogradContext* ctx, int64_t blank, double clamp) {
  ctx->saved_data["blank"] = blank;
  ctx->saved_data["clamp"] = clamp;
  ctx->saved_data["backend"] = static_cast<int64_t>(face::current());
}

variable_list outputs(AutogradContext* ctx, const Saved& out) {
  const auto& [costs, alphas, betas, den] = out;
  ctx->mark_non_differentiable({alphas, betas, den});
  return {costs, alphas, betas, den};
}

class Loss : public torch::autograd::Function<Loss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets, const Tensor& frames,
                               const Tensor& labels, int64_t blank, double clamp, bool fused_log_softmax, bool save) {
    remember(ctx, blank, clamp);
    ctx->saved_data["fused_log_softmax"] = fused_log_softmax;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<LossForwardSig>("rnnt_loss_forward");
    const Saved out = op.call(logits, targets, frames, labels, blank, clamp, fused_log_softmax, save);
    const auto& [costs, alphas, betas, den] = out;
    ctx->save_for_backward({logits, targets, frames, labels, costs, alphas, betas, den});
    return outputs(ctx, out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    face::Scope backend(static_cast<face::Backend>(ctx->saved_data["backend"].toInt()));
    const auto s = ctx->get_saved_variables();
    static const auto op = face::op<LossBackwardSig>("rnnt_loss_backward");
    Tensor grad = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], ctx->saved_data["blank"].toInt(),
                          ctx->saved_data["clamp"].toDouble(), ctx->saved_data["fused_log_softmax"].toBool());
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class Joint : public torch::autograd::Function<Joint> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& enc, const Tensor& pred, const Tensor& weight,
                               const Bias& bias, const Tensor& targets, const Tensor& frames, const Tensor& labels,
                               int64_t blank, const std::string& activation, double clamp, bool save) {
    remember(ctx, blank, clamp);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_bias"] = bias.has_value();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = face::op<JointForwardSig>("fused_joint_rnnt_loss_forward");
    const Saved out = op.call(enc, pred, weight, bias, targets, frames, labels, blank, activation, clamp, save);
    const auto& [costs, alphas, betas, den] = out;
    ctx->save_for_backward({enc, pred, weight, bias.value_or(Tensor()), targets, frames, labels, costs, alphas, betas,
                            den});
    return outputs(ctx, out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    face::Scope backend(static_cast<face::Backend>(ctx->saved_data["backend"].toInt()));
    const auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    static const auto op = face::op<JointBackwardSig>("fused_joint_rnnt_loss_backward");
    auto [g_enc, g_pred, g_weight, g_bias] =
        op.call(grads[0], s[0], s[1], s[2], has_bias ? Bias(s[3]) : std::nullopt, s[4], s[5], s[6], s[7], s[8], s[9],
                s[10], ctx->saved_data["blank"].toInt(), activation, ctx->saved_data["clamp"].toDouble());
    variable_list result(11);  // one per argument of forward
    const Tensor all[] = {g_enc, g_pred, g_weight, g_bias};
    for (int i = 0; i < (has_bias ? 4 : 3); ++i)  // edges: enc, pred, weight, then bias when there is one
      if (ctx->needs_input_grad(i)) result[i] = all[i];
    return result;
  }
};

Saved loss_forward_autograd(const Tensor& logits, const Tensor& targets, const Tensor& frames, const Tensor& labels,
                            int64_t blank, double clamp, bool fused_log_softmax, bool save) {
  const auto out = Loss::apply(logits, targets, frames, labels, blank, clamp, fused_log_softmax, save);
  return {out[0], out[1], out[2], out[3]};
}

Saved joint_forward_autograd(const Tensor& enc, const Tensor& pred, const Tensor& weight, const Bias& bias,
                             const Tensor& targets, const Tensor& frames, const Tensor& labels, int64_t blank,
                             c10::string_view activation, double clamp, bool save) {
  const auto out =
      Joint::apply(enc, pred, weight, bias, targets, frames, labels, blank, std::string(activation), clamp, save);
  return {out[0], out[1], out[2], out[3]};
}

// ---------------------------------------------------------------------------------------------------
// The public ops: save the lattice only when a gradient is wanted; reduce.

void check_reduction(c10::string_view op, c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "mean" || reduction == "sum", std::string(op),
                    ": reduction must be one of ('none', 'mean', 'sum'); got '", std::string(reduction), "'");
}

Tensor reduce(Tensor costs, c10::string_view reduction, bool zero_infinity) {
  if (zero_infinity) costs = at::where(at::isfinite(costs), costs, at::zeros_like(costs));  // as ctc_loss
  if (reduction == "mean") return costs.mean();
  if (reduction == "sum") return costs.sum();
  return costs;
}

// The same check and reduction as an op, for the torch.func route (amnets_kernels/_ops/functorch.py), which
// computes the costs with its own autograd.Function: op names the public op in the error.
Tensor rnnt_reduce(const Tensor& costs, c10::string_view reduction, bool zero_infinity, c10::string_view op) {
  check_reduction(op, reduction);
  return reduce(costs, reduction, zero_infinity);
}

Tensor rnnt_loss(const Tensor& logits, const Tensor& targets, const Tensor& frames, const Tensor& labels, int64_t blank,
                 double clamp, c10::string_view reduction, bool fused_log_softmax, bool zero_infinity) {
  check_reduction("rnnt_loss", reduction);
  static const auto op = face::op<LossForwardSig>("rnnt_loss_forward");
  const bool save = face::wants_grad({&logits}, std::nullopt);
  return reduce(std::get<0>(op.call(logits, targets, frames, labels, blank, clamp, fused_log_softmax, save)),
                reduction, zero_infinity);
}

Tensor fused_joint_rnnt_loss(const Tensor& enc, const Tensor& pred, const Tensor& weight, const Bias& bias,
                             const Tensor& targets, const Tensor& frames, const Tensor& labels, int64_t blank,
                             c10::string_view activation, double clamp, c10::string_view reduction,
                             bool zero_infinity) {
  check_reduction("fused_joint_rnnt_loss", reduction);
  static const auto op = face::op<JointForwardSig>("fused_joint_rnnt_loss_forward");
  const bool save = face::wants_grad({&enc, &pred, &weight}, bias);
  return reduce(std::get<0>(op.call(enc, pred, weight, bias, targets, frames, labels, blank, activation, clamp, save)),
                reduction, zero_infinity);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amnets, m) {
  const std::vector<at::Tag> layout{at::Tag::needs_contiguous_strides};
  // RNN-T loss of logits (B, T, U+1, V), torchaudio's arguments; zero_infinity as ctc_loss's.
  m.def("rnnt_loss(Tensor logits, Tensor targets, Tensor logit_lengths, Tensor target_lengths, int blank=-1, "
        "float clamp=-1.0, str reduction=\"mean\", bool fused_log_softmax=True, bool zero_infinity=False) -> Tensor");
  // (costs (B,), alphas, betas, den (B,T,U+1) in the accumulation dtype), the last three only when save.
  m.def("rnnt_loss_forward(Tensor logits, Tensor targets, Tensor logit_lengths, Tensor target_lengths, int blank, "
        "float clamp, bool fused_log_softmax, bool save) -> (Tensor, Tensor, Tensor, Tensor)", layout);
  m.def("rnnt_loss_backward(Tensor grad_costs, Tensor logits, Tensor targets, Tensor logit_lengths, "
        "Tensor target_lengths, Tensor costs, Tensor alphas, Tensor betas, Tensor den, int blank, float clamp, "
        "bool fused_log_softmax) -> Tensor", layout);
  // rnnt_loss(act(enc[:, :, None] + pred[:, None]) @ weight.T + bias, ...) without the 4-D logits.
  m.def("fused_joint_rnnt_loss(Tensor enc, Tensor pred, Tensor weight, Tensor? bias, Tensor targets, "
        "Tensor logit_lengths, Tensor target_lengths, int blank=-1, str activation=\"tanh\", float clamp=-1.0, "
        "str reduction=\"mean\", bool zero_infinity=False) -> Tensor");
  m.def("fused_joint_rnnt_loss_forward(Tensor enc, Tensor pred, Tensor weight, Tensor? bias, Tensor targets, "
        "Tensor logit_lengths, Tensor target_lengths, int blank, str activation, float clamp, bool save) "
        "-> (Tensor, Tensor, Tensor, Tensor)", layout);
  // -> (grad enc, pred, weight, bias or an empty tensor)
  m.def("fused_joint_rnnt_loss_backward(Tensor grad_costs, Tensor enc, Tensor pred, Tensor weight, Tensor? bias, "
        "Tensor targets, Tensor logit_lengths, Tensor target_lengths, Tensor costs, Tensor alphas, Tensor betas, "
        "Tensor den, int blank, str activation, float clamp) -> (Tensor, Tensor, Tensor, Tensor)", layout);
  // costs (B,) -> the loss as the public ops reduce it; op: the public op's name for the error message.
  m.def("_rnnt_reduce(Tensor costs, str reduction, bool zero_infinity, str op) -> Tensor");
}

TORCH_LIBRARY_IMPL(amnets, CompositeImplicitAutograd, m) {
  m.impl("rnnt_loss", &rnnt_loss);
  m.impl("fused_joint_rnnt_loss", &fused_joint_rnnt_loss);
  m.impl("_rnnt_reduce", &rnnt_reduce);
}

TORCH_LIBRARY_IMPL(amnets, Autograd, m) {
  m.impl("rnnt_loss_forward", &loss_forward_autograd);
  m.impl("rnnt_loss_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("fused_joint_rnnt_loss_forward", &joint_forward_autograd);
  m.impl("fused_joint_rnnt_loss_backward", torch::autograd::autogradNotImplementedFallback());
}

#define AMNETS_RNNT_ROUTES(m)                                          \
  m.impl("rnnt_loss_forward", &loss_forward);                          \
  m.impl("rnnt_loss_backward", &loss_backward);                        \
  m.impl("fused_joint_rnnt_loss_forward", &joint_forward);             \
  m.impl("fused_joint_rnnt_loss_backward", &joint_backward);

TORCH_LIBRARY_IMPL(amnets_native, CompositeExplicitAutograd, m) {
  m.impl("rnnt_device_labels", &device_labels);
}

TORCH_LIBRARY_IMPL(amnets, CPU, m) { AMNETS_RNNT_ROUTES(m) }
TORCH_LIBRARY_IMPL(amnets, CUDA, m) { AMNETS_RNNT_ROUTES(m) }

}  // namespace amnets
