// The backend in force and the routing of csrc/face.h.
#include "face.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>

namespace amnets::face {
namespace {

constexpr const char* kBackends[] = {"auto", "reference", "cpu", "triton", "cuda"};
constexpr const char* kOps[] = {"bsr_linear", "lowrank_lstm_cell", "lowrank_lstm_sequence", "rnnt_loss",
                                "fused_joint_rnnt_loss"};
constexpr int kOpCount = static_cast<int>(Op::Count);

std::atomic<int8_t> default_backend{static_cast<int8_t>(Backend::Auto)};
thread_local int override_backend = -1;
std::array<std::atomic<int8_t>, kOpCount> last_face{};  // Backend + 1; 0 = not run yet

std::array<std::atomic<bool>, kOpCount> hidden{};

}  // namespace

bool compiled(Op op, c10::DispatchKey key) {
  if (hidden[static_cast<int>(op)].load(std::memory_order_relaxed)) return false;
  // Asked once per (op, key): the kernels are registered when the library loads and stay.
  static std::array<std::array<std::atomic<int8_t>, 2>, kOpCount> known{};  // 0 unknown, 1 no, 2 yes
  std::atomic<int8_t>& slot = known[static_cast<int>(op)][key == c10::DispatchKey::CUDA];
  int8_t state = slot.load(std::memory_order_relaxed);
  if (state == 0) {
    bool both = true;
    for (const char* direction : {"_forward", "_backward"}) {
      const auto handle = c10::Dispatcher::singleton().findSchema(
          {std::string("amnets_native::") + kOps[static_cast<int>(op)] + direction, ""});
      both = both && handle.has_value() && handle->hasKernelForDispatchKey(key);
    }
    state = both ? 2 : 1;
    slot.store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

void hide_compiled(Op op, bool hide) { hidden[static_cast<int>(op)].store(hide); }

Backend parse(const std::string& text) {
  for (int i = 0; i < 5; ++i)
    if (text == kBackends[i]) return static_cast<Backend>(i);
  TORCH_CHECK_VALUE(false, "backend must be one of ('auto', 'reference', 'cpu', 'triton', 'cuda'); got '", text, "'");
}

const char* name(Backend backend) { return kBackends[static_cast<int>(backend)]; }
const char* name(Op op) { return kOps[static_cast<int>(op)]; }

Op op_named(const std::string& text) {
  for (int i = 0; i < kOpCount; ++i)
    if (text == kOps[i]) return static_cast<Op>(i);
  TORCH_CHECK_VALUE(false, "op must be one of ('bsr_linear', 'lowrank_lstm_cell', 'lowrank_lstm_sequence', "
                    "'rnnt_loss', 'fused_joint_rnnt_loss'); got '", text, "'");
}

Backend current() {
  return static_cast<Backend>(override_backend >= 0 ? override_backend
                                                    : default_backend.load(std::memory_order_relaxed));
}

void set_default(Backend backend) { default_backend.store(static_cast<int8_t>(backend)); }

int set_override(int backend) {
  TORCH_CHECK_VALUE(backend >= -1 && backend < 5, "amnets: no backend number ", backend);
  const int previous = override_backend;
  override_backend = backend;
  return previous;
}

bool native(Op op, const at::Tensor& t) {
  const Backend backend = current();
  Backend face;
  c10::DispatchKey key;
  if (t.device().is_cpu()) {
    face = Backend::Cpu;
    key = c10::DispatchKey::CPU;
  } else if (t.device().is_cuda()) {
    face = Backend::Cuda;
    key = c10::DispatchKey::CUDA;
  } else {
    return false;
  }
  if ((backend != Backend::Auto && backend != face) || !compiled(op, key)) return false;
  last_face[static_cast<int>(op)].store(static_cast<int8_t>(face) + 1, std::memory_order_relaxed);
  return true;
}

std::string last(Op op) {
  const int8_t face = last_face[static_cast<int>(op)].load(std::memory_order_relaxed);
  return face == 0 ? std::string() : std::string(kBackends[face - 1]);
}

void note(Op op, const std::string& face) {
  last_face[static_cast<int>(op)].store(static_cast<int8_t>(parse(face)) + 1, std::memory_order_relaxed);
}

namespace {
constexpr std::array<const char*, 3> kLabelChecks{"auto", "host", "device"};
std::atomic<int8_t> label_checks_mode{0};
}  // namespace

std::string label_checks() { return kLabelChecks[label_checks_mode.load(std::memory_order_relaxed)]; }

void set_label_checks(const std::string& mode) {
  for (size_t i = 0; i < kLabelChecks.size(); ++i) {
    if (mode == kLabelChecks[i]) return label_checks_mode.store(static_cast<int8_t>(i));
  }
  TORCH_CHECK_VALUE(false, "label checks must be one of ('auto', 'host', 'device'); got '", mode, "'");
}

bool label_checks_on_host(const at::Tensor& t) {
  const int8_t mode = label_checks_mode.load(std::memory_order_relaxed);
  return mode == 1 || (mode == 0 && t.is_cpu());
}

c10::OperatorHandle python_face(const char* op_name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({std::string("amnets_faces::") + op_name, ""});
  TORCH_CHECK(handle.has_value(), "amnets::", op_name, ": the backend in force ('", name(current()),
              "') or the tensors' device asks for a face that is not compiled in; the reference and Triton faces "
              "need the Python package amnets_kernels imported");
  return *handle;
}

}  // namespace amnets::face
