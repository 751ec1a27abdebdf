// The shared worker pool; see thread_pool.h.
//
//   run(n, fn): job = &fn; pending = n - 1; go[i] = ++gen for workers 1..n-1 (release) -> wake the parked
//   ones -> fn(0) -> spin until pending == 0.      worker i: spin, then park, until go[i] != seen ->
//   (*job)(i) -> --pending.
// `job` cannot change while a worker runs it: the next run() starts only after pending reached 0, and a
// worker outside a job never reads it.
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define MOE_PAUSE() _mm_pause()
#else
#define MOE_PAUSE() ((void)0)
#endif

namespace moe {

struct ThreadPool::State {
  struct alignas(64) Slot {
    std::atomic<uint64_t> go{0};
  };
  std::mutex run_mu;                          // one job at a time
  std::mutex mu;                              // guards parking and the worker list
  std::condition_variable cv;
  std::vector<std::unique_ptr<Slot>> slots;   // slots[i - 1] is worker i's
  std::atomic<const std::function<void(int)>*> job{nullptr};
  std::atomic<int> pending{0};
  std::atomic<int> parked{0};
  uint64_t gen = 0;                           // written under run_mu only

  void loop(int index, Slot* slot);
};

namespace {

// Spins until pred() holds or `micros` elapse; true if it holds. The clock is read every 64 polls.
template <typename Pred>
bool spin_until(Pred pred, int micros) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  for (unsigned i = 1;; ++i) {
    if (pred()) return true;
    MOE_PAUSE();
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() > end) return pred();
      if (i % 1024 == 0) sched_yield();   // let another runnable thread (torch's OpenMP workers) have the core
    }
  }
}

}  // namespace

void ThreadPool::State::loop(int index, Slot* slot) {
  uint64_t seen = 0;   // a new slot's go is 0; run() may store the first job before this thread starts
  for (;;) {
    auto ready = [&] { return slot->go.load(std::memory_order_acquire) != seen; };
    if (!spin_until(ready, kSpinMicros)) {
      std::unique_lock<std::mutex> lk(mu);
      parked.fetch_add(1);
      cv.wait(lk, ready);
      parked.fetch_sub(1);
    }
    seen = slot->go.load(std::memory_order_acquire);
    (*job.load(std::memory_order_acquire))(index);
    pending.fetch_sub(1, std::memory_order_acq_rel);
  }
}

ThreadPool::ThreadPool() : s_(new State()) {}
ThreadPool::~ThreadPool() = default;   // s_ is leaked on purpose: detached workers may still reference it

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

StragglerGuard g_guard;

}  // namespace

int StragglerGuard::team_for(int n, int64_t now, bool* probing) {
  *probing = false;
  const int c = cap.load(std::memory_order_relaxed);
  if (c <= 0 || c >= n) return n;
  if (now >= probe_at.load(std::memory_order_relaxed)) {
    *probing = true;
    probes.fetch_add(1, std::memory_order_relaxed);
    return n;
  }
  capped_runs.fetch_add(1, std::memory_order_relaxed);
  return c;
}

void StragglerGuard::judge(int team, int64_t waited, bool probing, int64_t now) {
  if (waited <= kLateNs) {
    strikes.store(0, std::memory_order_relaxed);
    if (probing) cap.store(0, std::memory_order_relaxed);
    return;
  }
  if (probing) {   // still late with the full team: stay capped, try again later
    probe_at.store(now + kProbeNs, std::memory_order_relaxed);
    return;
  }
  if (strikes.fetch_add(1, std::memory_order_relaxed) + 1 >= kStrikes && team > 1) {
    cap.store(team - 1, std::memory_order_relaxed);
    strikes.store(0, std::memory_order_relaxed);
    probe_at.store(now + kProbeNs, std::memory_order_relaxed);
  }
}

StragglerGuard& straggler_guard() { return g_guard; }

void ThreadPool::run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) return fn(0);
#ifdef _OPENMP
  // The OpenMP runtime torch already loaded (libgomp.so.1, shared by soname): its workers are the ones torch's
  // own ops just used and are still spinning, so they start at once and no second set of threads competes
  // with them for the cores. The team may be smaller than n; callers share work through a counter.
  bool probing = false;
  const int team = g_guard.team_for(n, now_ns(), &probing);
  if (team <= 1) return fn(0);
  int64_t caller_done = 0;
#pragma omp parallel num_threads(team)
  {
    const int i = omp_get_thread_num();
    fn(i);
    if (i == 0) caller_done = now_ns();
  }
  const int64_t end = now_ns();
  g_guard.judge(team, caller_done ? end - caller_done : 0, probing, end);
  return;
#endif
  State& s = *s_;
  std::lock_guard<std::mutex> one_job(s.run_mu);
  {
    std::lock_guard<std::mutex> lk(s.mu);
    while (int(s.slots.size()) < n - 1) {
      s.slots.push_back(std::make_unique<State::Slot>());
      std::thread([st = s_, index = int(s.slots.size()), slot = s.slots.back().get()] { st->loop(index, slot); })
          .detach();
    }
  }
  s.job.store(&fn, std::memory_order_release);
  s.pending.store(n - 1, std::memory_order_release);
  ++s.gen;
  for (int i = 1; i < n; ++i) s.slots[i - 1]->go.store(s.gen, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lk(s.mu);   // a worker parks under mu after checking go: none can miss this
    if (s.parked.load() > 0) s.cv.notify_all();
  }
  fn(0);
  spin_until([&] { return s.pending.load(std::memory_order_acquire) == 0; }, 1 << 30);
}

namespace {
std::atomic<ThreadPool*> g_pool{nullptr};
}

ThreadPool& pool() {
  ThreadPool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static std::once_flag atfork;
  std::call_once(atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
  auto* fresh = new ThreadPool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread won the race; this pool never started a worker
  return *p;
}

}  // namespace moe
