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
// per-step GEMMs, which keep at::parallel_for outright) the two pools' idle threads take turns on the
// cores — libgomp's spin for milliseconds after each region, so ours start late and the caller works alone.
// In an uncommitted experiment on the 2-core AMD EPYC (2026-11-29) bsr_linear's fwd+bwd on this pool grew
// 2.2x beside a busy process (3.2x on OpenMP) but its quiet time rose 2.0 -> 2.8-3.5 ms.
#pragma once

#include <cstdint>

namespace amnets::cpu {

using ChunkFn = void (*)(const void* body, int64_t begin, int64_t end);
void parallel_run(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, const void* body);

// Loops on this thread run on OpenMP while one is alive (nests). bsr_linear's autograd forward and backward
// open one.
class OpenMpScope {
 public:
  OpenMpScope();
  ~OpenMpScope();
  OpenMpScope(const OpenMpScope&) = delete;
  OpenMpScope& operator=(const OpenMpScope&) = delete;

 private:
  bool previous_;
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_run(begin, end, grain, [](const void* body, int64_t b, int64_t e) { (*static_cast<const F*>(body))(b, e); },
               &f);
}

}  // namespace amnets::cpu
