"""Batch scheduling, token rescheduling and fair sharing over plain ids (plain Python; never imports moe_engine).

`make_scheduler("fifo" | "expert", **options)` builds a per-step scheduler (scheduling/step.py):
`select(ready candidates, capacity, resident experts) -> seq ids` and `forget(seq_id)`.
`group_batches` splits an offline prompt list into batches whose expert usage overlaps.
scheduling/fairness.py shares steps among clients: turn-taking admission, seat caps, rows per client per step,
prefill chunk sizes under a token budget, the cold-expert cap and the prefill/decode time share.
"""
from .fairness import PhaseGate, chunk_sizes, cold_forced, fair_order, over_cap, rows_per_client
from .step import (SCHEDULERS, Candidate, ExpertAwareScheduler, FifoScheduler, Scheduler, distinct_experts,
                   group_batches, make_scheduler, misses)

__all__ = ["SCHEDULERS", "Candidate", "ExpertAwareScheduler", "FifoScheduler", "PhaseGate", "Scheduler",
           "chunk_sizes", "cold_forced", "distinct_experts", "fair_order", "group_batches", "make_scheduler",
           "misses", "over_cap", "rows_per_client"]
