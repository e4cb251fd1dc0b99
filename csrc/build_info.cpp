// The Python module amnets_kernels._C: importing it registers the compiled faces (TORCH_LIBRARY in
// the other files) and exposes what this binary was built with, and the frame engine's Python binding.
#include <torch/extension.h>

#include "cpu/amx.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "face.h"

#include <string>
#include <vector>

#ifdef AMNETS_WITH_CUDA
std::vector<std::string> amnets_cuda_archs();  // csrc/cuda/build_info.cu
int amnets_cuda_runtime_version();
std::string amnets_nvcc_arch_list();
#endif

namespace {

// CPU features seen at run time: the kernels choose their code path from these, never from the
// build machine (no -march=native).
std::vector<std::string> cpu_features() {
  std::vector<std::string> found;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define AMNETS_PROBE(name) \
  if (__builtin_cpu_supports(name)) found.emplace_back(name);
  AMNETS_PROBE("sse4.2")
  AMNETS_PROBE("avx")
  AMNETS_PROBE("avx2")
  AMNETS_PROBE("fma")
  AMNETS_PROBE("avx512f")
  AMNETS_PROBE("avx512bw")
  AMNETS_PROBE("avx512vl")
  AMNETS_PROBE("avx512bf16")
  AMNETS_PROBE("avx512fp16")
  AMNETS_PROBE("amx-tile")
  AMNETS_PROBE("amx-bf16")
#undef AMNETS_PROBE
#elif defined(__aarch64__)
  found.emplace_back("neon");
#endif
  return found;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu_features"] = cpu_features();
#ifdef AMNETS_WITH_CUDA
  info["cuda_archs"] = amnets_cuda_archs();
  info["cuda_runtime"] = amnets_cuda_runtime_version();
  info["nvcc_arch_list"] = amnets_nvcc_arch_list();
#else
  info["cuda_archs"] = std::vector<std::string>{};
  info["cuda_runtime"] = pybind11::none();
  info["nvcc_arch_list"] = pybind11::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  // The tile kernels (csrc/cpu/amx.h) the bf16 CPU kernels run now: "amx" only where the OS grants the tiles.
  info["cpu_amx"] = std::string(amnets::amx::name(amnets::amx::active()));
  info["cpu_dpbf16"] = amnets::simd::has_dpbf16();  // AVX512-BF16 in use (the CPU has it, and no test said "off")
  info["compiler"] = std::string(__VERSION__);
  return info;
}

}  // namespace

namespace amnets::cpu {
void bind_frame_engine(pybind11::module_& m);  // csrc/cpu/frame_engine.cpp
void bind_lstm_stack(pybind11::module_& m);    // csrc/cpu/lstm_stack.cpp
}
namespace amnets {
void bind_sources_snapshot(pybind11::module_& m);  // csrc/sources_snapshot.cpp
}
#ifdef AMNETS_WITH_CUDA
namespace amnets::cuda {
void bind_graph_call(pybind11::module_& m);  // csrc/cuda/graph_call.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "What this binary of amnets_kernels was compiled with.");
  amnets::cpu::bind_frame_engine(m);
  amnets::cpu::bind_lstm_stack(m);
  amnets::bind_sources_snapshot(m);
#ifdef AMNETS_WITH_CUDA
  amnets::cuda::bind_graph_call(m);
#endif
  // The backend in force (csrc/face.h); amnets_kernels._backend is their only user.
  namespace face = amnets::face;
  m.def("get_backend", [] { return std::string(face::name(face::current())); });
  m.def("set_backend", [](const std::string& name) { face::set_default(face::parse(name)); });
  m.def("push_backend", [](const std::string& name) { return face::set_override(static_cast<int>(face::parse(name))); },
        "Overrides the backend on this thread; returns the token that pop_backend restores.");
  m.def("pop_backend", [](int token) { face::set_override(token); });
  m.def("last_face", [](const std::string& op) { return face::last(face::op_named(op)); });
  m.def("note_face", [](const std::string& op, const std::string& name) { face::note(face::op_named(op), name); });
  m.def("compiled", [](const std::string& op, const std::string& key) {
    return face::compiled(face::op_named(op), key == "CUDA" ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  }, "Whether op's forward and backward kernels are compiled in for the dispatch key 'CPU' or 'CUDA'.");
  m.def("hide_compiled", [](const std::string& op, bool hide) { face::hide_compiled(face::op_named(op), hide); },
        "Tests only: pretend op's compiled kernels are absent (or present again).");
  m.def("cpu_contention", [] {
    const auto stats = amnets::cpu::contention_stats();
    pybind11::dict d;
    d["enabled"] = stats.enabled;
    d["stalls"] = stats.stalls;
    d["serial_for_ms"] = static_cast<double>(stats.serial_for_ns) / 1e6;
    d["own_waits"] = stats.own_waits;
    d["openmp_for_ms"] = static_cast<double>(stats.openmp_for_ns) / 1e6;
    return d;
  }, "The CPU loops' contention guard (csrc/cpu/parallel.h): stalls seen since start, serial window left; OpenMP "
     "windows begun (waits among our own threads), OpenMP window left.");
  m.def("cpu_window", [](const std::string& kind, double seconds) {
    TORCH_CHECK_VALUE(kind == "serial" || kind == "openmp", "cpu_window: kind must be 'serial' or 'openmp'; got '",
                      kind, "'");
    // 1e6 s (11 days) bounds the product well inside int64 nanoseconds (a cast of inf or 1e10 s is undefined)
    TORCH_CHECK_VALUE(seconds >= 0.0 && seconds <= 1e6, "cpu_window: seconds must be in [0, 1e6]; got ", seconds);
    amnets::cpu::open_window(kind == "serial" ? amnets::cpu::Window::kSerial : amnets::cpu::Window::kOpenMp,
                             static_cast<int64_t>(seconds * 1e9));
  },
        "Tests only: the CPU loops run on their callers alone ('serial') or on ATen's OpenMP threads ('openmp') for "
        "this long, as in the contention guard's windows (0 ends one).");
  m.def("set_cpu_amx", [](const std::string& mode) { amnets::amx::set_mode(mode.c_str()); },
        "'auto' (AMX tiles where the CPU has them), 'off', or 'emulate' (tests only: the tile kernels on a "
        "scalar emulation of AMX, on any CPU).");
  m.def("set_cpu_dpbf16", [](const std::string& mode) {
    TORCH_CHECK_VALUE(mode == "auto" || mode == "off", "set_cpu_dpbf16: mode must be 'auto' or 'off'; got '", mode,
                      "'");
    amnets::simd::dpbf16_off().store(mode == "off", std::memory_order_relaxed);
  },
        "Tests only: 'off' runs the bf16 kernels as on a CPU without AVX512-BF16 (with set_cpu_amx('off'): as on "
        "one with neither); 'auto' where the CPU has it.");
  m.def("get_label_checks", &face::label_checks);
  m.def("set_label_checks", &face::set_label_checks);
}
