"""Batch scheduling and token rescheduling over plain ids (plain Python; never imports moe_engine).

`make_scheduler("fifo" | "expert", **options)` builds a per-step scheduler (scheduling/step.py):
`select(ready candidates, capacity, resident experts) -> seq ids` and `forget(seq_id)`.
`group_batches` splits an offline prompt list into batches whose expert usage overlaps.
"""
from .step import (SCHEDULERS, Candidate, ExpertAwareScheduler, FifoScheduler, Scheduler, distinct_experts,
                   group_batches, make_scheduler, misses)

__all__ = ["SCHEDULERS", "Candidate", "ExpertAwareScheduler", "FifoScheduler", "Scheduler", "distinct_experts",
           "group_batches", "make_scheduler", "misses"]
