// Autocast (torch.autocast) for the amnets ops: one boxed kernel, parametrized by device and policy, casts
// the floating-point tensor arguments (optional ones too; index and length tensors are left alone) and
// calls the op again with autocast off. Without it an op's body ran with autocast still on: the at:: ops
// inside the kernels were cast behind their backs (a raw "expected scalar type Float but found BFloat16"),
// and mixed-dtype arguments failed the ops' own checks (every floating argument must share x's dtype,
// csrc/checks.h).
//
// Policies, as torch's autocast lists have them for the nearest relatives (linear, lstm; losses):
//   LowerPrecision (the autocast dtype): bsr_linear, lowrank_lstm_cell, lowrank_lstm_sequence
//   Fp32: rnnt_loss, fused_joint_rnnt_loss
//   AsGiven (no casts, autocast off): the *_backward ops, which autograd calls on the forward's own
//     dtypes; with `loss.backward()` inside the autocast region their kernels would be cast otherwise;
//     and every amnets_native op (below).
// Each *_forward op has its public op's policy, for a direct caller (under a public op autocast is off
// already). The casts are at::autocast::cached_cast's: differentiable, fp64 left alone, and an fp32 leaf
// that wants a gradient (a parameter) cast once per autocast region.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>

namespace amnets {
namespace {

enum class Policy { LowerPrecision, Fp32, AsGiven };

template <c10::DeviceType device, Policy policy>
void autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  if constexpr (policy != Policy::AsGiven) {
    const at::ScalarType to = policy == Policy::Fp32 ? at::kFloat : at::autocast::get_autocast_dtype(device);
    const auto count = static_cast<std::ptrdiff_t>(op.schema().arguments().size());
    for (auto arg = stack->end() - count; arg != stack->end(); ++arg)
      if (arg->isTensor()) *arg = at::autocast::cached_cast(to, arg->toTensor(), device);  // None stays None
  }
  // Off for the whole call, as torch's own autocast wrappers do: the kernels' inner at:: ops must run in
  // the dtype the arguments now have.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

template <c10::DeviceType device, Policy policy>
torch::CppFunction kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&autocast<device, policy>>();
}

template <c10::DeviceType device, Policy policy>
void register_op(torch::Library& m, const std::string& name) {
  m.impl(name.c_str(), kernel<device, policy>());
  m.impl((name + "_forward").c_str(), kernel<device, policy>());
  m.impl((name + "_backward").c_str(), kernel<device, Policy::AsGiven>());
}

template <c10::DeviceType device>
void register_for(torch::Library& m) {
  for (const char* name : {"bsr_linear", "lowrank_lstm_cell", "lowrank_lstm_sequence"})
    register_op<device, Policy::LowerPrecision>(m, name);
  for (const char* name : {"rnnt_loss", "fused_joint_rnnt_loss"}) register_op<device, Policy::Fp32>(m, name);
}

// The faces' kernels (amnets_native, csrc/ops.cpp) run in the dtypes they are given, for a direct caller under
// autocast too (the public ops reach them with autocast off already). Without this their inner at:: GEMMs were
// cast: lowrank_lstm_cell_forward at 6 rows under CPU autocast raised "self and mat2 must have the same dtype".
// tests/test_autocast.py checks that every amnets_native op is listed.
template <c10::DeviceType device>
void register_native_for(torch::Library& m) {
  for (const char* name :
       {"bsr_linear_forward", "bsr_linear_backward", "bsr_check_pattern", "bsr_lstm_cell_forward",
        "bsr_lstm_sequence_forward", "bsr_lstm_stack_step", "lowrank_lstm_cell_forward", "lowrank_lstm_stack_step",
        "lowrank_lstm_cell_backward", "lowrank_lstm_sequence_forward", "lowrank_lstm_sequence_backward",
        "rnnt_loss_forward", "rnnt_loss_backward", "fused_joint_rnnt_loss_forward", "fused_joint_rnnt_loss_backward",
        "rnnt_device_labels"})
    m.impl(name, kernel<device, Policy::AsGiven>());
}

}  // namespace

TORCH_LIBRARY_IMPL(amnets, AutocastCPU, m) { register_for<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(amnets, AutocastCUDA, m) { register_for<c10::DeviceType::CUDA>(m); }
TORCH_LIBRARY_IMPL(amnets_native, AutocastCPU, m) { register_native_for<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(amnets_native, AutocastCUDA, m) { register_native_for<c10::DeviceType::CUDA>(m); }

}  // namespace amnets
