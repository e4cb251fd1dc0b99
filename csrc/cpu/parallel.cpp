// The CPU kernels' thread pool: see parallel.h for why and what.
//
// One job at a time. The job's fields are written by the caller before it publishes the job by storing the
// cursor (generation << 32 | next chunk) and then the generation (release). A thread claims chunk i of
// generation g by a compare-exchange of the cursor from (g, i) to (g, i + 1), so a worker that wakes late,
// after its job is over, fails the exchange and touches nothing; a successful claim keeps the job's fields
// valid until that chunk is counted done, because the caller publishes nothing new before every chunk is.
#include "parallel.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace amnets::cpu {
namespace {

constexpr int64_t kChunksPerThread = 2;  // dynamic claiming needs a few chunks per thread to rebalance
constexpr auto kIdleSpin = std::chrono::microseconds(50);  // a worker's wait for the next job before it sleeps
constexpr auto kJoinSpin = std::chrono::microseconds(20);  // the caller's wait for claimed chunks before it sleeps

thread_local bool in_parallel = false;
thread_local bool openmp_scope = false;

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Waits until `value` differs from `old`: spins for `spin`, then sleeps (futex). Returns the new value.
template <typename T>
T wait_change(const std::atomic<T>& value, T old, std::chrono::microseconds spin) {
  const auto until = std::chrono::steady_clock::now() + spin;
  for (int i = 0;; ++i) {
    const T now = value.load(std::memory_order_acquire);
    if (now != old) return now;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
    relax();
  }
  for (;;) {
    value.wait(old, std::memory_order_acquire);
    const T now = value.load(std::memory_order_acquire);
    if (now != old) return now;
  }
}

class Pool {
 public:
  // Runs the job on this thread and the workers; returns when every chunk is done.
  void run(int threads, int64_t begin, int64_t end, int64_t chunk, ChunkFn fn, const void* body) {
    if (static_cast<int>(workers_.size()) != threads - 1) resize(threads - 1);
    fn_ = fn;
    body_ = body;
    begin_ = begin;
    end_ = end;
    chunk_ = chunk;
    const auto chunks = static_cast<uint32_t>((end - begin + chunk - 1) / chunk);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint32_t g = generation_.load(std::memory_order_relaxed) + 1;
    cursor_.store(static_cast<uint64_t>(g) << 32, std::memory_order_release);
    generation_.store(g, std::memory_order_release);
    generation_.notify_all();
    claim(g);
    for (uint32_t now = done_.load(std::memory_order_acquire); now != chunks;) now = wait_change(done_, now, kJoinSpin);
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  // Claims and runs chunks of generation g until none is left (or the job is another's).
  void claim(uint32_t g) {
    const bool outer = in_parallel;
    in_parallel = true;  // a parallel_for inside a chunk runs inline
    uint64_t v = cursor_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(v >> 32) != g || static_cast<uint32_t>(v) >= chunks_.load(std::memory_order_relaxed)) break;
      if (!cursor_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t b = begin_ + static_cast<int64_t>(static_cast<uint32_t>(v)) * chunk_;
      try {
        fn_(body_, b, std::min(end_, b + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      const uint32_t chunks = chunks_.load(std::memory_order_relaxed);
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) done_.notify_all();
      v = cursor_.load(std::memory_order_acquire);
    }
    in_parallel = outer;
  }

  void work() {
    uint32_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      seen = wait_change(generation_, seen, kIdleSpin);
      if (stop_.load(std::memory_order_acquire)) return;
      claim(seen);
    }
  }

  void resize(size_t n) {
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false, std::memory_order_release);
    for (size_t i = 0; i < n; ++i) workers_.emplace_back([this] { work(); });
  }

  std::atomic<uint32_t> generation_{0};
  std::atomic<uint64_t> cursor_{0};
  std::atomic<uint32_t> chunks_{0};
  std::atomic<uint32_t> done_{0};
  std::atomic<bool> stop_{false};
  ChunkFn fn_ = nullptr;
  const void* body_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 1;
  std::mutex error_mutex_;
  std::exception_ptr error_;
  std::vector<std::thread> workers_;

 public:
  std::mutex dispatch;  // one caller at a time; others run inline
};

// Never destroyed (its workers may outlive static destruction). A forked child has the parent's pool but
// none of its threads: it starts a new one (the old one's memory is left).
Pool* pool = nullptr;
std::once_flag atfork_once;

Pool& the_pool() {
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { pool = nullptr; }); });
  if (pool == nullptr) pool = new Pool();
  return *pool;
}

}  // namespace

OpenMpScope::OpenMpScope() : previous_(openmp_scope) { openmp_scope = true; }
OpenMpScope::~OpenMpScope() { openmp_scope = previous_; }

void parallel_run(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, const void* body) {
  if (end <= begin) return;
  // AMNETS_CPU_POOL=0: ATen's OpenMP regions instead (for A/B measurements, and as an escape hatch).
  static const bool use_pool = [] {
    const char* env = std::getenv("AMNETS_CPU_POOL");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!use_pool || openmp_scope) return at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(body, b, e); });
  const int64_t range = end - begin;
  grain = std::max<int64_t>(grain, 1);
  const int threads = in_parallel || range <= grain ? 1 : at::get_num_threads();
  if (threads <= 1) return fn(body, begin, end);
  static std::mutex create;
  Pool* p;
  {
    std::lock_guard<std::mutex> lock(create);
    p = &the_pool();
  }
  std::unique_lock<std::mutex> lock(p->dispatch, std::try_to_lock);
  if (!lock.owns_lock()) return fn(body, begin, end);  // another thread is using the pool
  const int64_t chunks = std::min((range + grain - 1) / grain, threads * kChunksPerThread);
  p->run(threads, begin, end, (range + chunks - 1) / chunks, fn, body);
}

}  // namespace amnets::cpu
