// amnets::cpu::parallel_for: the parallel loops of the frame engine (csrc/cpu/frame_engine.cpp) and of
// bsr_linear (csrc/cpu/bsr.cpp), on our own small thread pool instead of an OpenMP region (at::parallel_for),
// because of what a shared CPU does to a fork/join region.
//
// An OpenMP region splits the range evenly over its threads and returns when the last one is done: when
// another process holds a core, the thread that was descheduled holds half the work, and the region waits a
// scheduler time slice for it, spinning on the other core meanwhile (benchmarks/contention.py measured
// 3-4x growth beside one busy process on 2 cores, where a fair share is 1.5x). Here the range is cut into
// more chunks than threads and every thread, the caller included, claims the next chunk from a shared
// counter: a worker that is not running claims nothing, so the caller does the work instead of waiting for
// it, and a caller that must wait for a claimed chunk blocks (futex) after a short spin, handing its core to
// the descheduled worker. Workers spin a little for the next job (back-to-back calls stay cheap) and then
// sleep.
//
// Semantics as at::parallel_for: f(chunk_begin, chunk_end) over [begin, end) in chunks of at least `grain`
// (one chunk, on this thread, when the range is a single grain, torch.get_num_threads() is 1, inside
// another parallel loop, or while another thread is using the pool); the first exception is rethrown.
// Chunk boundaries differ from at::parallel_for's: bodies must not depend on them (ours write disjoint
// outputs per index). The pool has torch.get_num_threads() - 1 workers, resized when that changes.
// AMNETS_CPU_POOL=0 (read once) runs at::parallel_for everywhere instead.
//
// Inside an OpenMpScope the loops run on at::parallel_for: where our loops alternate with ATen's OpenMP
// regions (an op autograd will differentiate: its backward's reductions and GEMMs; the low-rank LSTM's
// GEMMs before and after its time loop; the RNN-T losses' GEMMs and lattice passes) the two pools' idle
// threads take turns on the cores — libgomp's spin for milliseconds after each region, so ours start late
// and the caller works alone.
// In an uncommitted experiment on the 2-core AMD EPYC (2026-11-29) bsr_linear's fwd+bwd on this pool grew
// 2.2x beside a busy process (3.2x on OpenMP) but its quiet time rose 2.0 -> 2.8-3.5 ms.
//
// The contention guard (parallel.cpp) covers what dynamic claiming cannot: a fork/join loop whose thread
// was descheduled while it held a chunk (every OpenMP region, ATen's and MKL's included, and a pool chunk
// already claimed) waits a scheduler slice (4 ms here) for it. Every thread that runs our loops is watched:
// at most every 2 ms a loop's caller reads their runqueue wait (Linux schedstat; after loops paused for over
// 16 ms, as a live stream's do between frames, the first look only takes baselines); when one has waited for a
// CPU a quarter of the time (averaged over ~16 ms, so the odd 2-4 ms wait of a quiet machine does not
// count) the process is contended, and for a window (4 ms, x4 while stalls recur, up to 256 ms) every loop
// runs on its caller alone, and so do ATen's and MKL's regions inside an OpenMpScope (their thread counts
// are set to 1 on this thread only, and put back at the next of our loops or checkpoints after the window, or
// when the scope closes). The loops after the window probe again: baselines, then a verdict on the next 8 ms
// or more alone. A wait counts only up to the CPU time this process left unused on the CPUs it may run on: waits
// among its own threads (a pool worker woken behind libgomp's threads, which spin for milliseconds after each
// ATen region) open an OpenMP window instead (1 s): our loops run on those threads, as inside an OpenMpScope.
// One thread beside a busy process costs what one
// thread costs (~1.5-1.9x the quiet 2-thread time here) instead of a slice per region; quiet, the guard
// costs a file read per watched thread per 2 ms. AMNETS_CONTENTION_GUARD=0 (or false/off/no; read once) turns it off;
// contention_stats() says what it did.
#pragma once

#include <cstdint>

namespace amnets::cpu {

// Products of fewer multiply-adds than this stay on their caller's thread (expand, the frame engine's block
// products). Lower is faster back to back and slower in a live stream (one AMD EPYC, 2 cores, H=192 AmNets
// frames, 2 threads, bound 32K against 256K): a low-rank all-cheap frame took 9.5 against 12.7 us in a loop,
// but 247 against 148 us when called every 30 ms, because each frame then wakes a sleeping worker that
// arrives late and cold (1 thread: 163 us). Kept at 256K until the pool can share small jobs with awake
// workers only.
constexpr int64_t kParallelMinMacs = int64_t(1) << 18;

using ChunkFn = void (*)(const void* body, int64_t begin, int64_t end);
void parallel_run(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, const void* body);

// Loops on this thread run on OpenMP while one is alive (nests); in a contended window it also makes this
// thread's OpenMP and MKL regions single-threaded (checked when it opens and at each of our loops; restored
// when it closes). Opened by the ops whose loops alternate with ATen's (see above).
class OpenMpScope {
 public:
  OpenMpScope();
  ~OpenMpScope();
  OpenMpScope(const OpenMpScope&) = delete;
  OpenMpScope& operator=(const OpenMpScope&) = delete;
  void follow(bool serial);  // parallel_for calls it: the thread counts follow the guard's window
  // What each of our loops does for the guard, between two ATen regions of a long op whose loops are far apart
  // (a fused joint tile beside a busy process): a look at most every 2 ms, and the thread counts follow.
  void checkpoint();
  int threads() const;  // this thread's OpenMP count outside a window

 private:
  bool serial_ = false;
  int omp_threads_ = 0, mkl_threads_ = 0;
};

struct ContentionStats {
  bool enabled;
  uint64_t stalls;        // loops that found a descheduled thread, since the process started
  int64_t serial_for_ns;  // how long loops still run on their caller alone (0: not now)
  uint64_t own_waits;     // OpenMP windows begun: looks that found our threads waiting for each other
  int64_t openmp_for_ns;  // how long loops still run on ATen's OpenMP threads instead of the pool (0: not now)
};
ContentionStats contention_stats();
// Tests: run every loop serially (kSerial) or on OpenMP's threads (kOpenMp) for the next `ns` nanoseconds, as
// the guard's windows do (0 ends a window now). A forked child opens no OpenMP window (parallel.cpp).
enum class Window { kSerial, kOpenMp };
void open_window(Window kind, int64_t ns);

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_run(begin, end, grain, [](const void* body, int64_t b, int64_t e) { (*static_cast<const F*>(body))(b, e); },
               &f);
}

}  // namespace amnets::cpu
