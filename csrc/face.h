// Which face runs an op, decided in C++ so that the default path (the compiled kernel of the tensors'
// device) never enters Python between a torch.ops.amnets.* call and the kernel.
//
// The backend in force is per thread: a process default (amnets_kernels.set_backend, AMNETS_BACKEND)
// and an override on top (amnets_kernels.use_backend, and autograd's backward, which runs under the
// backend of its forward). The Python package keeps no copy of it: amnets_kernels.get_backend() reads
// it here. When the backend asks for a face that is not compiled in (the reference, a Triton face, a
// missing CUDA part), the op calls the Python face op of the same schema, amnets_faces::<op>_<dir>,
// which the Python package registers and which resolves the face as it always has (FallbackWarning,
// FaceUnavailableError, last_face). A C++ program without Python runs the compiled faces only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace amnets::face {

enum class Backend : int8_t { Auto, Reference, Cpu, Triton, Cuda };
enum class Op : int8_t { BsrLinear, LowrankLstmCell, LowrankLstmSequence, RnntLoss, FusedJointRnntLoss, Count };

Backend parse(const std::string& name);  // raises ValueError for an unknown name
const char* name(Backend backend);
const char* name(Op op);
Op op_named(const std::string& name);  // raises ValueError for an unknown op

Backend current();
void set_default(Backend backend);
// The thread's override: -1 for none, else a Backend. Returns the previous value (to restore).
int set_override(int backend);

// Restores the thread's override when it leaves scope (autograd's backward).
class Scope {
 public:
  explicit Scope(Backend backend) : previous_(set_override(static_cast<int>(backend))) {}
  ~Scope() { set_override(previous_); }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  int previous_;
};

// Whether amnets_native::<op>_forward and _backward have kernels for `key` (CPU or CUDA).
bool compiled(Op op, c10::DispatchKey key);
// Tests: pretend `op` has no compiled kernels (to exercise the fallback to the reference face).
void hide_compiled(Op op, bool hide);

// Whether the compiled kernel of `t`'s device runs `op` now (and if so, records it as the last face).
bool native(Op op, const at::Tensor& t);
// The face that ran `op` most recently in this process ("" if none); the Python faces record theirs.
std::string last(Op op);
void note(Op op, const std::string& face);

// How the RNN-T losses check their labels and lengths (csrc/rnnt.cpp): "host" reads them on the host and
// raises a ValueError naming a bad one, and warns about non-finite costs (a device sync per call for CUDA
// tensors); "device" never reads them on the host: a sequence with bad labels or lengths gets safe
// stand-ins for the kernels and a NaN cost with a zero gradient (as a sequence with no finite path);
// "auto" (the default; AMNETS_LABEL_CHECKS, amnets_kernels.set_label_checks) is host on the CPU, where
// it costs nothing, and device on CUDA, so a CUDA loss never waits for the GPU and CUDA graphs can capture it.
std::string label_checks();
void set_label_checks(const std::string& mode);  // raises ValueError for an unknown mode
bool label_checks_on_host(const at::Tensor& t);

// amnets_faces::<op_name>, the Python face op; a clear error when the Python package has not registered it.
c10::OperatorHandle python_face(const char* op_name);

inline at::Tensor contiguous(const at::Tensor& t) { return t.contiguous(); }
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}
template <typename T>
const T& contiguous(const T& value) {
  return value;
}

// One direction of an op, amnets::<name>: its compiled kernel amnets_native::<name> (given contiguous
// tensors) when `native` says so, else the Python face op amnets_faces::<name> (the tensors as given).
template <typename Sig>
class Route {
 public:
  explicit Route(std::string name)
      : name_(std::move(name)),
        kernel_(c10::Dispatcher::singleton().findSchemaOrThrow(("amnets_native::" + name_).c_str(), "").typed<Sig>()) {}

  template <typename... Args>
  decltype(auto) operator()(bool native, const Args&... args) const {
    if (native) return kernel_.call(contiguous(args)...);
    return python_face(name_.c_str()).typed<Sig>().call(args...);
  }

 private:
  std::string name_;
  c10::TypedOperatorHandle<Sig> kernel_;
};

// Whether an autograd graph will be built through these inputs (the public ops save what backward needs
// only then).
inline bool wants_grad(std::initializer_list<const at::Tensor*> tensors, const std::optional<at::Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  bool any = bias.has_value() && bias->requires_grad();
  for (const at::Tensor* t : tensors) any = any || t->requires_grad();
  return any;
}

// The public op amnets::<name> called from C++ (a composite op calling its forward, autograd its backward).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("amnets::") + name).c_str(), "").typed<Sig>();
}

}  // namespace amnets::face
