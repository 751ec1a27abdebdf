"""The loader: IO worker threads owned by the cache, fed from one priority queue; the live cache's transport.

Jobs are ordered by (priority, submission order): demand loads (priority 0) pre-empt queued
prefetches (priority >= 1, by lookahead distance). A queued job can be promoted (a prefetched
expert became a demand) or cancelled (a stale prefetch); a running job always finishes. What a
job does (read a byte range from disk, copy to the GPU) is a callable the cache supplies; the
loader knows nothing of experts, slots or files. Compute waits on the job's event, for exactly
the expert it needs.

The Loader is the cache controller's `Transport` (controller.py) for real IO: submit / promote / cancel /
busy / wait, the clock the controller measures with, and how many loads run at once. The simulator's
modelled link implements the same protocol (profiling/simulate.py).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
DEMAND = 0


@dataclass(eq=False)
class LoadJob:
    layer: int
    expert: int
    slot: int
    priority: int                          # 0 = demand; d >= 1 = prefetch for d layers ahead
    prefetch: bool = False
    state: str = QUEUED
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0                   # time the job's work took
    extra: dict = field(default_factory=dict)   # what the work function wants to keep (e.g. a CUDA event)


class Loader:
    def __init__(self, work: Callable[[LoadJob, int], None], num_workers: int = 2, name: str = "moe-load",
                 clock: Callable[[], float] = time.perf_counter):
        self._work = work                  # work(job, worker_index) does the IO; raises on failure
        self.now = clock                   # the time source of job.seconds (and of the controller's clock)
        self.parallelism = num_workers     # loads that run at once
        self._heap: list[tuple[int, int, LoadJob]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0                  # jobs a worker has taken and not finished
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"{name}-{i}", daemon=True)
                         for i in range(num_workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: LoadJob) -> LoadJob:
        with self._cond:
            if self._closed:
                raise RuntimeError("the expert loader is closed")
            heapq.heappush(self._heap, (job.priority, next(self._order), job))
            self._cond.notify()
        return job

    def promote(self, job: LoadJob) -> None:
        """Make a queued job a demand load (pushed again; the stale heap entry is skipped)."""
        with self._cond:
            if job.state == QUEUED and job.priority != DEMAND:
                job.priority = DEMAND
                heapq.heappush(self._heap, (DEMAND, next(self._order), job))
                self._cond.notify()

    def cancel(self, job: LoadJob) -> bool:
        """Cancel a job that has not started; True when it will never run."""
        with self._cond:
            if job.state != QUEUED:
                return False
            job.state = CANCELLED
            job.done.set()
            return True

    def busy(self, job: LoadJob) -> bool:
        """Queued or running: a worker may still write the job's slot."""
        return job.state in (QUEUED, RUNNING)

    def wait(self, job: LoadJob) -> None:
        """Until the job has finished (done, failed or cancelled)."""
        job.done.wait()

    def _next(self) -> LoadJob | None:
        with self._cond:
            while True:
                while self._heap:
                    prio, _, job = heapq.heappop(self._heap)
                    if job.state == QUEUED and prio == job.priority:
                        job.state = RUNNING
                        self._running += 1
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _run(self, worker: int) -> None:
        while (job := self._next()) is not None:
            t0 = self.now()
            try:
                self._work(job, worker)
                job.state = DONE
            except BaseException as e:  # noqa: BLE001 -- handed to the thread that waits for this expert
                job.error, job.state = e, FAILED
            job.seconds = self.now() - t0
            job.done.set()
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def join(self) -> None:
        """Until no job is queued or running (tests and benchmarks that need a quiet loader)."""
        with self._cond:
            self._cond.wait_for(lambda: self._running == 0 and not any(j.state == QUEUED for _, _, j in self._heap))

    def pending(self) -> int:
        with self._cond:
            return sum(1 for _, _, j in self._heap if j.state == QUEUED)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for _, _, job in self._heap:
                if job.state == QUEUED:
                    job.state = CANCELLED
                    job.done.set()
            self._heap.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
