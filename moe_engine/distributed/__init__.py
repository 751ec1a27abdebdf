"""Expert parallelism: the routed experts of every MoE layer split over N processes (ranks), each with its own
expert cache, budget and tiers; everything else runs on rank 0.

    placement.py  which rank owns which expert (contiguous, or balanced by a trace's expert load); a rank's view
                  of the checkpoint through its share
    shard.py      one rank's experts: its cache, strategies, and its part of a MoE layer's output
    comm.py       the step protocol: commands, the layer's broadcast, the all_reduce that combines
    group.py      rendezvous (env://, torchrun or spawned), startup agreement, failure detection
    launch.py     rank 0: build_engine / load, ParallelEngine, the strategy and cache view that span the ranks
    worker.py     ranks 1..N-1
    stats.py      per-rank figures and the merged stats sections

Design (SPMD over the experts only). Rank 0 owns the tokenizer, scheduler, sampling, KV caches and every
non-expert weight, and runs the whole forward. At each MoE layer, after routing, its strategy broadcasts the
layer's hidden states, routing weights and ids (and the predictor's forecast, and any scheduling hint) to
every rank; each rank computes the (token, expert) pairs of the experts it owns through its own cache (the
strategy one process would use: runtime/build.bind_experts), and one float32 all_reduce(sum) gives every
rank the layer's routed output. Shared experts, attention and everything else stay on rank 0. Outputs do not
depend on the number of ranks: each pair is computed once, as in one process; only the summation order of
a token's K expert outputs can differ (float32 rounding, 1e-7). Workers never read an expert they do not own.

Forecasts travel with the step: rank 0's predictor sees the routing (it is the only rank that routes), and
its scores for later layers go with the layer's broadcast; each rank prefetches the forecast experts it owns.
Why not replicate the decoder on every rank? It would need every rank's KV cache and non-expert weights in
its budget and a mirrored scheduler, to save a broadcast of N x D values per layer (a few KiB at decode).
"""
from .group import RankError
from .launch import ParallelEngine, build_engine, load, run_if_worker

__all__ = ["build_engine", "load", "run_if_worker", "ParallelEngine", "RankError"]
