// amnets::cpu::parallel_for: the frame engine's parallel loops (csrc/cpu/frame_engine.cpp), on our own small
// thread pool instead of an OpenMP region (at::parallel_for), because of what a shared CPU does to a
// fork/join region.
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
//
// Why only the frame engine: a frame is our code from end to end. Where our loops alternate with ATen ops
// (bsr_linear's backward, the low-rank LSTM's per-step GEMMs) the two pools' idle threads take turns on the
// cores: OpenMP's spin for milliseconds after each region, so ours start late and the caller works alone.
// In an uncommitted experiment on the 2-core AMD EPYC (benchmarks/contention.py, 2026-11-29), bsr_linear's
// forward on this pool: M=16 fwd+bwd grew 2.2x beside a busy process (3.2x on OpenMP) but its quiet time
// rose 2.0 -> 2.8-3.5 ms. The frame engine's quiet frames stayed within noise (README, "CPU under contention").
// AMNETS_CPU_POOL=0 (read once) runs at::parallel_for instead.
#pragma once

#include <cstdint>

namespace amnets::cpu {

using ChunkFn = void (*)(const void* body, int64_t begin, int64_t end);
void parallel_run(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, const void* body);

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_run(begin, end, grain, [](const void* body, int64_t b, int64_t e) { (*static_cast<const F*>(body))(b, e); },
               &f);
}

}  // namespace amnets::cpu
