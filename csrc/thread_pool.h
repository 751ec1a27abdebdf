// The persistent worker pool shared by the CPU kernels of moe_engine._C (qmatmul.cpp, bf16_gemv.cpp).
//
// run(n, fn) executes fn(0), ..., fn(n - 1) concurrently, fn(0) on the caller's thread, and returns when all
// finished. Workers are started on first use and grown on demand; each has its own "go" word, so a job wakes
// exactly the workers it uses. After a job a worker spins (with pause and sched_yield) for kSpinMicros before
// it parks on a condition variable: decode issues a matmul every few tens of microseconds, and waking a
// parked thread costs ~50 us in a VM. One job at a time (concurrent callers queue). After fork() the child
// starts a fresh pool (the parent's workers do not exist there); pools are never destroyed, so no worker is
// joined during interpreter shutdown.
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
