// Intel AMX for the CPU faces' bf16 kernels: eight tile registers of up to 16 rows x 64 bytes and TDPBF16PS
// (a 16 x 16 fp32 tile += a 16 x 32 bf16 tile times a 32 x 16 bf16 one, the second operand in pairs: row q,
// column n holds elements (2q, n) and (2q + 1, n)). A kernel is written once against a `Tiles` type and
// instantiated twice:
//   Hardware  the instructions, in a function compiled with AMNETS_AMX and called only where active() says so;
//   Emulated  the same instructions in scalar C++ (Intel SDM semantics; fp32 sums, no denormal flushing) that
//             also asserts what the hardware would fault on (a tile used unconfigured, operand shapes that do
//             not match). Tests run the kernels on it on every CPU, so their tile layout is checked on the AMD
//             build machines too; only the instruction encoding needs an AMX CPU.
// Tile numbers are template arguments: the instructions take them as immediates.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AMNETS_HAVE_AMX 1
#define AMNETS_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
#endif

namespace amnets::amx {

// LDTILECFG's 64-byte operand, palette 1. A tile left at 0 rows is unconfigured: using it faults.
struct Config {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row
  uint8_t rows[16] = {};
  void set(int tile, int rows_, int colsb_) { rows[tile] = uint8_t(rows_), colsb[tile] = uint16_t(colsb_); }
};
static_assert(sizeof(Config) == 64);

// Which tile implementation the bf16 kernels use now.
enum class Kernel { kNone, kHardware, kEmulated };
Kernel active();
// "auto" (the hardware where the CPU and the OS offer it), "off" (never), "emulate" (tests only: every
// bf16 kernel that has a tile version runs it on Emulated, slowly).
void set_mode(const char* mode);
// The CPU has AMX-TILE and AMX-BF16, the OS enabled their state (XCR0) and granted it to this process.
bool hardware();
const char* name(Kernel kernel);

#ifdef AMNETS_HAVE_AMX
// AT&T operand order (sources first). Loads and stores name memory only through a register, so they clobber
// "memory": the compiler must not move a store to what a tile loads (a scratch block) past the load.
struct Hardware {
  static inline __attribute__((always_inline)) void configure(const Config& config) {
    __asm__ volatile("ldtilecfg %0" ::"m"(config) : "memory");
  }
  template <int T>
  static inline __attribute__((always_inline)) void zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static inline __attribute__((always_inline)) void load(const void* from, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(from), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static inline __attribute__((always_inline)) void store(void* to, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(to), "r"(stride), "i"(T) : "memory");
  }
  template <int C, int A, int B>  // C += A B
  static inline __attribute__((always_inline)) void dot_bf16() {
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  static inline __attribute__((always_inline)) void release() { __asm__ volatile("tilerelease" ::: "memory"); }
};
#endif

struct Emulated {
  struct State {
    Config config;
    bool configured = false;
    uint8_t tile[8][16][64];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void check(int tile) {
    const State& s = state();
    TORCH_INTERNAL_ASSERT(s.configured && s.config.rows[tile] > 0 && s.config.colsb[tile] > 0,
                          "AMX emulation: tile ", tile, " used but not configured");
  }
  static void configure(const Config& config) {
    TORCH_INTERNAL_ASSERT(config.palette == 1, "AMX emulation: palette ", int(config.palette));
    for (int t = 0; t < 16; ++t) {
      TORCH_INTERNAL_ASSERT(t < 8 || (config.rows[t] == 0 && config.colsb[t] == 0), "AMX emulation: tile ", t);
      TORCH_INTERNAL_ASSERT(config.rows[t] <= 16 && config.colsb[t] <= 64, "AMX emulation: tile ", t, " is ",
                            int(config.rows[t]), " x ", config.colsb[t], " bytes");
    }
    State& s = state();
    s.config = config, s.configured = true;
    std::memset(s.tile, 0, sizeof s.tile);
  }
  template <int T>
  static void zero() {
    check(T);
    std::memset(state().tile[T], 0, sizeof state().tile[T]);
  }
  template <int T>
  static void load(const void* from, int64_t stride) {  // rows and bytes past the configured ones read as 0
    check(T);
    State& s = state();
    std::memset(s.tile[T], 0, sizeof s.tile[T]);
    for (int r = 0; r < s.config.rows[T]; ++r)
      std::memcpy(s.tile[T][r], static_cast<const char*>(from) + r * stride, s.config.colsb[T]);
  }
  template <int T>
  static void store(void* to, int64_t stride) {
    check(T);
    const State& s = state();
    for (int r = 0; r < s.config.rows[T]; ++r)
      std::memcpy(static_cast<char*>(to) + r * stride, s.tile[T][r], s.config.colsb[T]);
  }
  template <int C, int A, int B>
  static void dot_bf16() {
    check(C), check(A), check(B);
    State& s = state();
    const Config& g = s.config;
    const int rows = g.rows[C], n = g.colsb[C] / 4, k = g.colsb[A] / 4;
    TORCH_INTERNAL_ASSERT(g.colsb[C] % 4 == 0 && g.colsb[A] % 4 == 0 && g.rows[A] == rows && g.rows[B] == k &&
                              g.colsb[B] == g.colsb[C],
                          "AMX emulation: TDPBF16PS on tiles of mismatched shapes");
    auto bf16 = [&](int tile, int r, int i) {  // element i of row r as a float (a bf16 is a float's high half)
      uint16_t half;
      std::memcpy(&half, s.tile[tile][r] + 2 * i, 2);
      const uint32_t bits = uint32_t(half) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    };
    for (int m = 0; m < rows; ++m) {
      float acc[16];
      std::memcpy(acc, s.tile[C][m], 64);
      for (int q = 0; q < k; ++q)
        for (int j = 0; j < n; ++j) {
          acc[j] += bf16(A, m, 2 * q) * bf16(B, q, 2 * j);
          acc[j] += bf16(A, m, 2 * q + 1) * bf16(B, q, 2 * j + 1);
        }
      for (int j = n; j < 16; ++j) acc[j] = 0.f;  // the hardware zeroes what lies past the configured shape
      std::memcpy(s.tile[C][m], acc, 64);
    }
    std::memset(s.tile[C][rows], 0, (16 - rows) * 64);
  }
  static void release() { state().configured = false; }
};

// f(std::integral_constant<int, J>{}) for J = 0 .. N - 1, in order: a tile number the instructions can take.
template <int N, class F>
inline __attribute__((always_inline)) void each(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) { (f(std::integral_constant<int, J>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

// K::run<Tiles>(args...) on the tiles `kernel` names (kHardware or kEmulated): the hardware instantiation
// compiled for AMX and AVX-512 (for the vector code around the tiles: K::run must be always_inline), or the
// emulation.
#ifdef AMNETS_HAVE_AMX
template <class K, class... A>
AMNETS_AMX void run_hardware(A... a) {
  K::template run<Hardware>(a...);
}
#endif
template <class K, class... A>
void run_emulated(A... a) {
  K::template run<Emulated>(a...);
}
template <class K, class... A>
void run(Kernel kernel, A... a) {
#ifdef AMNETS_HAVE_AMX
  if (kernel == Kernel::kHardware) return run_hardware<K>(a...);
#endif
  TORCH_INTERNAL_ASSERT(kernel == Kernel::kEmulated, "amx::run without tiles");
  run_emulated<K>(a...);
}

}  // namespace amnets::amx
