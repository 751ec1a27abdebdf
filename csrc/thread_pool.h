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

#include <functional>

namespace moe {

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
