// The persistent worker pool shared by the CPU kernels of moe_engine._C (qmatmul.cpp, bf16_gemv.cpp).
//
// run(n, fn) executes fn(i) on up to n threads concurrently, fn(0) on the caller's thread, and returns when all
// finished; callers share out their work through a counter, so they never assume all n indices run.
//
// Built with OpenMP (setup.py passes -fopenmp), run() is an OpenMP parallel region: in the Python process that
// is the libgomp torch loaded (shared by soname), so kernels and torch's own ops use one team of threads.
// Two teams would fight over the cores: after each parallel op torch's workers spin for milliseconds, and a
// second pool's workers then run at half speed (measured: decode 16 tok/s instead of 63 on 2 cores).
//
// Without OpenMP: a pool of std::threads started on first use and grown on demand; each has its own "go"
// word, so a job wakes exactly the workers it uses. After a job a worker spins (with pause and sched_yield)
// for kSpinMicros before it parks on a condition variable: decode issues a matmul every few tens of
// microseconds, and waking a parked thread costs ~50 us in a VM. One job at a time (concurrent callers
// queue). After fork() the child starts a fresh pool; pools are never destroyed, so no worker is joined
// during interpreter shutdown.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace moe {

// The straggler guard of the OpenMP path: when the caller of run() waited over kLateNs at the end for the rest of
// the team kStrikes times in a row (a worker's core is taken by another process, so it runs a scheduler time
// slice later, on every parallel op), later runs use a team one thread smaller; every kProbeNs the full team is
// tried once and kept if it was on time. Waking a parked worker costs ~50 us in a VM and a chunk of work much
// less than 1 ms, so a quiet machine never trips it. Results never depend on the team size (every kernel splits
// work so that each output is computed by one thread in a fixed order).
class StragglerGuard {
 public:
  static constexpr int64_t kLateNs = 1000000;
  static constexpr int kStrikes = 3;
  static constexpr int64_t kProbeNs = 250000000;

  // The team for a run asked for n threads at time `now` (ns); *probing: a full-team try while capped.
  int team_for(int n, int64_t now, bool* probing);
  // After the run: `waited` ns the caller spent waiting for the team at the end.
  void judge(int team, int64_t waited, bool probing, int64_t now);

  std::atomic<int> cap{0};             // 0: none
  std::atomic<int> strikes{0};
  std::atomic<int64_t> probe_at{0};
  std::atomic<int64_t> capped_runs{0}, probes{0};
};

// The process-wide guard pool().run consults.
StragglerGuard& straggler_guard();

class ThreadPool;

// The process-wide pool (created on first call).
ThreadPool& pool();

class ThreadPool {
 public:
  static constexpr int kSpinMicros = 2000;   // a worker's busy wait for its next job before it parks

  ThreadPool();
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void run(int n, const std::function<void(int)>& fn);

 private:
  struct State;
  State* s_;   // never freed while workers run (pools live as long as the process)
};

}  // namespace moe
