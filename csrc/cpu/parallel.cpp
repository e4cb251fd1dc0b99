// The CPU kernels' thread pool: see parallel.h for why and what.
//
// One job at a time. The job's fields are written by the caller before it publishes the job by storing the
// cursor (generation << 32 | next chunk) and then the generation (release). A thread claims chunk i of
// generation g by a compare-exchange of the cursor from (g, i) to (g, i + 1), so a worker that wakes late,
// after its job is over, fails the exchange and touches nothing; a successful claim keeps the job's fields
// valid until that chunk is counted done, because the caller publishes nothing new before every chunk is.
#include "parallel.h"

#include <ATen/Parallel.h>
#include <fcntl.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace amnets::cpu {
namespace {

// An on/off environment switch, read by the caller once: off for 0 / false / off / no in any case (the Python
// package refuses other values at import, amnets_kernels/_backend.py; a C++ program gets "on" for them).
bool switched_off(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr) return false;
  std::string value(env);
  for (char& ch : value) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return value == "0" || value == "false" || value == "off" || value == "no";
}

constexpr int64_t kChunksPerThread = 2;  // dynamic claiming needs a few chunks per thread to rebalance
constexpr auto kIdleSpin = std::chrono::microseconds(50);  // a worker's wait for the next job before it sleeps
constexpr auto kJoinSpin = std::chrono::microseconds(20);  // the caller's wait for claimed chunks before it sleeps

thread_local bool in_parallel = false;
thread_local OpenMpScope* openmp_scope = nullptr;  // the outermost one open on this thread

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

// ---------------------------------------------------------------------------------------------------
// The contention guard (parallel.h). All state is process-wide: contention is the machine's, not a loop's.
namespace guard {

constexpr int64_t kCheckEveryNs = 2'000'000;   // one look at the watched threads per 2 ms at most (~3 us each)
constexpr double kHorizonNs = 16e6;            // a stall: one of them waited for a CPU for a quarter of the
constexpr double kStalledShare = 0.25;         // time, averaged over ~16 ms (one 2-4 ms wait is not one)
constexpr int64_t kFirstWindowNs = 4'000'000;  // serial windows: 4 ms, x4 while stalls recur
constexpr int64_t kRecurNs = 100'000'000;      // (within 100 ms of the last window's end, or within 1 s when
constexpr int64_t kRecurMaxNs = 1'000'000'000;  // no look in between found the machine quiet),
constexpr int64_t kMaxWindowNs = 256'000'000;  // up to 256 ms (a probe costs a few ms; serial after a hog left)
// The probe after a window: the first look takes baselines, a look at least 8 ms later decides on that
// interval alone (two scheduler slices: a busy neighbour makes one of our threads wait in it). The average
// would take ~10 looks to climb from 0 past the threshold, and beside a hog each look is a tile of ATen
// regions that each wait a slice for a descheduled thread: the probe ran 2-thread for 100 ms and more, so
// the next stall counted as a new burst and the windows restarted at 4 ms (fused joint 1.3-3.7 s a call
// beside one hog, 2-core Intel Xeon, against 1.27 s on one thread).
constexpr int64_t kProbeNs = 8'000'000;
constexpr size_t kMaxWatched = 64;
// Loops whose caller paused longer than the horizon (a live stream's frames, one every 30 ms; the caller
// slept) get no look: the counters would say nothing about now, and reading them cost ~70 us a frame here (a
// file per watched thread, cold). The look after one that skipped takes fresh baselines; the next one decides.
// A caller that ran for a quarter of the gap or more did not pause: it ran ATen regions between our loops,
// and a long gap there means they waited for descheduled threads (beside one hog on the Xeon a fused joint
// tile of ~2 ms took 80 ms; when every look after one only took baselines the guard saw nothing).
constexpr int64_t kIdleNs = 16'000'000;
// Waits among our own threads are not a busy neighbour: after an ATen op, libgomp's team threads spin for
// milliseconds (GOMP_SPINCOUNT), and a pool worker woken meanwhile waits for their core. Counting that as a
// stall made every op that follows an ATen op run on one thread (a model mixes them: bf16 bsr_linear M=64 on
// 2 AMD EPYC threads, one call after each F.linear: 2.9 ms with serial windows of up to 256 ms that then hung
// over the op alone, 1.7-1.8 on OpenMP's threads, 1.8-2.0 alone on the pool). So a wait counts as a stall
// only up to the CPU time this process did not use of the CPUs it may run on (its affinity mask) in the
// interval: a neighbour that ran there took at most that. Waits the process's own threads explain (it used
// every CPU) start an OpenMP window instead: for kOwnWindowNs our loops run on ATen's OpenMP threads, which are
// the ones spinning, rather than wake pool workers that would queue behind them.
constexpr int64_t kOwnWindowNs = 1'000'000'000;

std::atomic<int64_t> serial_until{0}, window{kFirstWindowNs}, last_look{0}, openmp_until{0};
std::atomic<uint64_t> stalls{0}, own_waits{0};
std::atomic<uint32_t> generation{0};
// Guarded by watched_mutex:
bool stale = true;          // the watched threads' baselines predate a pause
int64_t probe_since = 0;    // when the probe after a window took its baselines (0: no probe under way)
bool quiet_seen = true;     // a look since the last window found no thread stalled
int64_t process_cpu = 0;    // this process's CPU time at the last look

struct Watched {
  pid_t tid;
  int64_t waited;      // ns runnable but not running, at the last look
  double share = 0.0;  // of the time it waited for a CPU a neighbour may have held: moving average over kHorizonNs
  double own = 0.0;    // of the time it waited at all: the same average
};
// Pointers: a forked child starts new ones (a thread of the parent may have held the mutex; the old ones
// are left), and its threads register again.
std::mutex* watched_mutex = new std::mutex();
std::vector<Watched>* watched = new std::vector<Watched>();
// A forked child never opens OpenMP windows: libgomp cannot run a team in the child of a process that ran one
// (its first region waits forever at the team barrier), so a window inherited or opened there hung our loops.
bool forked_child = false;
const int atfork = pthread_atfork(nullptr, nullptr, [] {
  watched_mutex = new std::mutex();
  watched = new std::vector<Watched>();
  generation.fetch_add(1);
  forked_child = true;
  openmp_until.store(0);
});

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool enabled() {
  static const bool on = !switched_off("AMNETS_CONTENTION_GUARD");
  return on;
}

// CPU time of this thread (CLOCK_THREAD_CPUTIME_ID) or of the whole process (CLOCK_PROCESS_CPUTIME_ID).
int64_t cpu_ns(clockid_t clock) {
  timespec t{};
  ::clock_gettime(clock, &t);
  return int64_t(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
}

bool serial(int64_t now) { return now < serial_until.load(std::memory_order_relaxed); }

bool openmp(int64_t now) { return now < openmp_until.load(std::memory_order_relaxed); }

int allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return ::sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(CPU_COUNT(&set), 1) : 1;
}

// Nanoseconds thread `tid` of this process has spent runnable but not running (Linux schedstat); -1 when
// it is gone (or the kernel does not say).
int64_t runqueue_wait_ns(pid_t tid) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/task/%d/schedstat", static_cast<int>(tid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char text[128];
  const ssize_t n = ::read(fd, text, sizeof(text) - 1);
  ::close(fd);
  if (n <= 0) return -1;
  text[n] = 0;
  unsigned long long ran = 0, waited = 0;
  return std::sscanf(text, "%llu %llu", &ran, &waited) == 2 ? static_cast<int64_t>(waited) : -1;
}

// Every thread that runs our loops (callers, pool workers, OpenMP team threads) is watched from then on.
void watch_this_thread() {
  thread_local uint32_t watched_in = ~0u;
  const uint32_t g = generation.load(std::memory_order_relaxed);
  if (watched_in == g) return;
  watched_in = g;
  const pid_t tid = ::gettid();
  std::lock_guard<std::mutex> lock(*watched_mutex);
  if (watched->size() < kMaxWatched) watched->push_back({tid, std::max<int64_t>(runqueue_wait_ns(tid), 0)});
}

void note_stall(int64_t now) {
  stalls.fetch_add(1, std::memory_order_relaxed);
  // A busy neighbour stalls again at the first probe after a window: the window grows. A stall long after
  // the last window (a burst of other work that ended) gets the first window only.
  const int64_t since = now - serial_until.load(std::memory_order_relaxed);
  const bool recurring = since < kRecurNs || (!quiet_seen && since < kRecurMaxNs);
  quiet_seen = false;
  const int64_t w = recurring ? std::min(4 * window.load(std::memory_order_relaxed), kMaxWindowNs) : kFirstWindowNs;
  window.store(w, std::memory_order_relaxed);
  serial_until.store(now + w, std::memory_order_relaxed);
}

// At most every 2 ms, from a loop's caller: has a watched thread waited for a CPU for a large share of the
// recent time? That is a busy neighbour, whichever region the thread was in: ours, ATen's or MKL's. A thread
// that sleeps does not wait; a spinning one competes like any other. The average keeps out the single waits
// of a few ms that a quiet machine gives too (a short-lived task, or two of our threads briefly on one core).
void look(int64_t now) {
  int64_t last = last_look.load(std::memory_order_relaxed);
  if (now - last < kCheckEveryNs) return;
  std::unique_lock<std::mutex> lock(*watched_mutex, std::try_to_lock);
  if (!lock.owns_lock()) return;
  const bool probing = probe_since != 0;
  if (probing && now - probe_since < kProbeNs) return;  // the probe's interval is not over
  if (!last_look.compare_exchange_strong(last, now)) return;
  thread_local int64_t my_look = 0, my_cpu = 0;  // this caller's last look, and its CPU time then
  const int64_t cpu = cpu_ns(CLOCK_THREAD_CPUTIME_ID);
  const bool paused = now - last > kIdleNs && 4 * (cpu - my_cpu) < now - my_look;
  my_look = now, my_cpu = cpu;
  if (paused) {
    stale = true;
    probe_since = 0;
    return;
  }
  if (serial_until.load(std::memory_order_relaxed) > last) {  // the loops ran on through a window: probe
    stale = true;
    probe_since = now;
  } else if (probing) {
    probe_since = 0;  // this look decides
  }
  const bool decide_probe = probing && probe_since == 0;
  std::vector<Watched>& threads = *watched;
  const int64_t proc = cpu_ns(CLOCK_PROCESS_CPUTIME_ID);
  // CPU time a neighbour may have had on our CPUs in the interval (what this process left of them)
  const double spare = std::max(0.0, double(allowed_cpus()) * double(now - last) - double(proc - process_cpu));
  process_cpu = proc;
  bool stalled = false, own_stall = false;
  for (size_t i = 0; i < threads.size();) {
    const int64_t w = runqueue_wait_ns(threads[i].tid);
    if (w < 0) {  // the thread has ended
      threads[i] = threads.back();
      threads.pop_back();
      continue;
    }
    if (stale) {
      threads[i].waited = w, threads[i].share = threads[i].own = 0.0;
      ++i;
      continue;
    }
    const double interval = static_cast<double>(now - last), waited = static_cast<double>(w - threads[i].waited);
    const double weight = decide_probe ? 1.0 : std::min(1.0, interval / kHorizonNs);
    threads[i].share += weight * (std::min(1.0, std::min(waited, spare) / interval) - threads[i].share);
    threads[i].own += weight * (std::min(1.0, waited / interval) - threads[i].own);
    threads[i].waited = w;
    if (threads[i].share >= kStalledShare) stalled = true;
    if (threads[i].own >= kStalledShare) own_stall = true;
    ++i;
  }
  if (!stale && !stalled) quiet_seen = true;
  stale = false;
  if (stalled) {
    note_stall(now);
  } else if (own_stall && !forked_child) {
    if (!openmp(now)) own_waits.fetch_add(1, std::memory_order_relaxed);  // counts windows begun, not extended
    openmp_until.store(now + kOwnWindowNs, std::memory_order_relaxed);
  }
}

}  // namespace guard

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
    if (guard::enabled()) guard::watch_this_thread();
    uint32_t seen = generation_.load(std::memory_order_acquire);
    // A resize that came before this thread first ran has already made the bump that would wake it: the
    // stop it set is visible now (set before the bump, read after it), so leave instead of waiting for a
    // change that will not come while resize() waits in join() (a hang on the next call after a resize).
    if (stop_.load(std::memory_order_acquire)) return;
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

// MKL's per-thread thread count, by value (mkl_service.h maps the C name to this one; the lower-case
// symbol is the Fortran interface, which takes a pointer). Weak: present in torch's x86 builds (MKL).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

OpenMpScope::OpenMpScope() {
  if (openmp_scope != nullptr) return;  // nested: the outermost one sets the thread counts
  openmp_scope = this;
  follow(guard::enabled() && guard::serial(guard::now_ns()));
}

OpenMpScope::~OpenMpScope() {
  if (openmp_scope != this) return;
  follow(false);
  openmp_scope = nullptr;
}

void OpenMpScope::follow(bool serial) {
  if (serial == serial_) return;
  serial_ = serial;
  if (serial) {
    at::get_num_threads();  // ATen's per-thread OpenMP setup first: it would override ours
    omp_threads_ = omp_get_max_threads();
    omp_set_num_threads(1);
    if (MKL_Set_Num_Threads_Local) mkl_threads_ = MKL_Set_Num_Threads_Local(1);
  } else {
    omp_set_num_threads(omp_threads_);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);
  }
}

ContentionStats contention_stats() {
  const int64_t left = guard::serial_until.load(std::memory_order_relaxed) - guard::now_ns();
  const int64_t openmp_left = guard::openmp_until.load(std::memory_order_relaxed) - guard::now_ns();
  return {guard::enabled(), guard::stalls.load(std::memory_order_relaxed), std::max<int64_t>(left, 0),
          guard::own_waits.load(std::memory_order_relaxed), std::max<int64_t>(openmp_left, 0)};
}

void open_window(Window kind, int64_t ns) {
  if (kind == Window::kOpenMp && guard::forked_child) return;  // never there (guard::forked_child says why)
  auto& until = kind == Window::kSerial ? guard::serial_until : guard::openmp_until;
  until.store(guard::now_ns() + std::max<int64_t>(ns, 0));
}

namespace {

// The guard's verdict for this thread now (a look at most every 2 ms); inside an OpenMpScope the ATen and MKL
// regions that follow take it too (not from inside a parallel region, whose thread settings end with it).
bool contended(int64_t now) {
  bool serial = guard::serial(now);
  OpenMpScope* scope = in_parallel || at::in_parallel_region() ? nullptr : openmp_scope;
  // One thread has nothing to wait for; a scope in a window has set this thread's count to 1 itself.
  const int threads = scope != nullptr ? scope->threads() : at::get_num_threads();
  if (!serial && threads > 1) {
    guard::watch_this_thread();
    guard::look(now);
    serial = guard::serial(now);
  }
  if (scope != nullptr) scope->follow(serial);
  return serial;
}

}  // namespace

void OpenMpScope::checkpoint() {
  if (guard::enabled() && openmp_scope == this) contended(guard::now_ns());
}

int OpenMpScope::threads() const { return serial_ ? omp_threads_ : at::get_num_threads(); }

void parallel_run(int64_t begin, int64_t end, int64_t grain, ChunkFn fn, const void* body) {
  if (end <= begin) return;
  // AMNETS_CPU_POOL=0: ATen's OpenMP regions instead (for A/B measurements, and as an escape hatch).
  static const bool use_pool = !switched_off("AMNETS_CPU_POOL");
  grain = std::max<int64_t>(grain, 1);
  const int64_t range = end - begin;
  if (range <= grain) return fn(body, begin, end);  // one chunk: no threads, no guard
  const bool guarded = guard::enabled();
  const int64_t now = guarded ? guard::now_ns() : 0;
  if (guarded && contended(now)) return fn(body, begin, end);
  if (!use_pool || openmp_scope != nullptr || (guarded && guard::openmp(now))) {
    return at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
      if (guarded) guard::watch_this_thread();
      fn(body, b, e);
    });
  }
  const int threads = in_parallel ? 1 : at::get_num_threads();
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
