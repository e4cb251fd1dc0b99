// Which tile implementation (amx.h) the bf16 kernels use, and whether this CPU and OS can run AMX at all.
#include "amx.h"

#include <atomic>
#include <cstring>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace amnets::amx {
namespace {

enum class Mode { kAuto, kOff, kEmulate };
std::atomic<Mode> mode{Mode::kAuto};

}  // namespace

bool hardware() {
#if defined(AMNETS_HAVE_AMX) && defined(__linux__)
  static const bool yes = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    // The OS must have enabled the tile state (XCR0 bits 17 TILECFG and 18 TILEDATA; a hypervisor may not)...
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    // ...and Linux (5.16 on) hands the 8 KB of tile data to a process only on request: without it the first
    // tile instruction raises SIGILL. The grant covers every thread of the process.
    constexpr long kReqPerm = 0x1023, kGetPerm = 0x1022, kTileData = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kTileData) != 0) return false;
    unsigned long granted = 0;
    return syscall(SYS_arch_prctl, kGetPerm, &granted) == 0 && (granted & (1ul << kTileData)) != 0;
  }();
  return yes;
#else
  return false;
#endif
}

Kernel active() {
  switch (mode.load(std::memory_order_relaxed)) {
    case Mode::kOff: return Kernel::kNone;
    case Mode::kEmulate: return Kernel::kEmulated;
    default: return hardware() ? Kernel::kHardware : Kernel::kNone;
  }
}

void set_mode(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    mode = Mode::kAuto;
  } else if (std::strcmp(name, "off") == 0) {
    mode = Mode::kOff;
  } else if (std::strcmp(name, "emulate") == 0) {
    mode = Mode::kEmulate;
  } else {
    TORCH_CHECK_VALUE(false, "set_cpu_amx: mode must be 'auto', 'off' or 'emulate'; got '", name, "'");
  }
}

const char* name(Kernel kernel) {
  switch (kernel) {
    case Kernel::kHardware: return "amx";
    case Kernel::kEmulated: return "amx emulated (tests only)";
    default: return "none";
  }
}

}  // namespace amnets::amx
