"""The job ledger: loads a cache has started and compute has not yet consumed, and the transport that runs them.

    Transport (protocol)   submit / promote / cancel / busy / wait, `now` and `parallelism`
        live:       experts/loader.Loader (IO threads reading disk or copying host -> device)
        simulated:  profiling/simulate.LinkTransport (one modelled link on a modelled timeline)
    JobLedger              (layer, expert) -> LoadJob; submits, waits (stall time counted), cancels

A job stays in the ledger from submission until compute takes it (`take`), its expert is evicted
(a finished prefetch nobody used) or it is forgotten (cancelled or failed: its expert leaves the table).
Jobs that may still write their slot (`busy`) are never evicted. Ids and jobs only: no bytes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from .loader import DEMAND, FAILED, LoadJob
from .tracker import CacheCounters


class Transport(Protocol):
    parallelism: int                            # loads that can run at once
    now: Callable[[], float]                    # the clock (seconds) the controller measures with

    def submit(self, job: LoadJob) -> None: ...

    def promote(self, job: LoadJob) -> None:
        """Make a queued job a demand load (no-op once it runs)."""

    def cancel(self, job: LoadJob) -> bool:
        """Drop a job that has not started; True when it will never run."""

    def busy(self, job: LoadJob) -> bool:
        """Queued or running: the job may still write its slot."""

    def wait(self, job: LoadJob) -> None:
        """Until the job has finished."""


class JobLedger:
    def __init__(self, transport: Transport, counters: CacheCounters, on_issue: Callable[[], None]):
        self.transport, self.counters = transport, counters
        self._on_issue = on_issue                    # the lookahead clock counts loads per layer pass
        self._jobs: dict[tuple[int, int], LoadJob] = {}

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._jobs

    def get(self, layer: int, e: int) -> LoadJob | None:
        return self._jobs.get((layer, e))

    def submit(self, layer: int, e: int, slot: int, priority: int) -> LoadJob:
        """Start a load into `slot`: a demand (priority 0) or a prefetch `priority` MoE layers ahead."""
        self._on_issue()
        job = LoadJob(layer, e, slot, priority, prefetch=priority != DEMAND)
        self._jobs[(layer, e)] = job
        self.counters.issued(layer, e, job.prefetch, priority)
        self.transport.submit(job)
        return job

    def take(self, layer: int, e: int) -> LoadJob | None:
        """Compute needs e now: wait for its load (stall time counted) and remove it; None for a hit."""
        job = self._jobs.get((layer, e))
        if job is None:
            return None
        self.wait(job)
        del self._jobs[(layer, e)]
        return job

    def wait(self, job: LoadJob) -> None:
        if self.transport.busy(job):
            t0 = self.transport.now()
            self.transport.wait(job)
            self.counters.stall(self.transport.now() - t0)

    def promote(self, layer: int, e: int) -> None:
        job = self._jobs.get((layer, e))
        if job is not None:
            self.transport.promote(job)

    def evicted(self, layer: int, e: int | None) -> None:
        """e left the table to make room: a finished load nobody used goes with it."""
        if e is not None:
            self._jobs.pop((layer, e), None)
            self.counters.evicted(layer, e)

    def inflight(self, layer: int) -> set[int]:
        """Experts of `layer` whose slot a load may still write: never evicted."""
        return {e for (lay, e), j in self._jobs.items() if lay == layer and self.transport.busy(j)}

    def cancel_stale(self, layer: int, needed: Iterable[int]) -> list[int]:
        """Queued prefetches for `layer` that it does not need now: cancelled where they have not started; their
        experts (to be dropped from the table by the caller)."""
        needed = set(needed)
        gone = [e for (lay, e), j in list(self._jobs.items())
                if lay == layer and e not in needed and j.prefetch and self.transport.cancel(j)]
        for e in gone:
            self.forget(layer, e)
        return gone

    def failed(self, layer: int) -> list[int]:
        """Experts of `layer` whose earlier load failed (e.g. a prefetch): forgotten, so they load again."""
        gone = [e for (lay, e), j in list(self._jobs.items()) if lay == layer and j.state == FAILED]
        for e in gone:
            self.forget(layer, e)
        return gone

    def forget(self, layer: int, e: int) -> None:
        """A load that will never complete."""
        del self._jobs[(layer, e)]
        self.counters.cancelled(layer, e)

    def busy_unneeded(self, layer: int, needed: Iterable[int]) -> LoadJob | None:
        """A load of `layer` still running or queued for an expert this pass does not need (a stale prefetch
        holding a slot), or None."""
        needed = set(needed)
        return next((j for (lay, e), j in self._jobs.items()
                     if lay == layer and e not in needed and self.transport.busy(j)), None)
