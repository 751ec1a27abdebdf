"""One rank's share of the routed experts: its cache, its strategies, and its part of a MoE layer's output.

    Shard.compute(layer, x [N, D], weights [N, K], ids [N, K], forecast) -> float32 [N, D]
        keep the (token, expert) pairs whose expert this rank owns -> [P, 1] rows in local expert ids
        -> the layer's strategy (model/expert_compute.py: ExpertLoop or FusedExperts over this rank's cache,
        chosen by runtime/build.bind_experts exactly as for one process) -> index_add into its token's row

The pairs of other ranks add zeros here and their values there: the sum over ranks (one all_reduce) is the
layer's routed output. Every (token, expert) pair is computed on exactly one rank with the same weights and
inputs as in one process; only the float32 summation order of a token's K experts differs (1e-7 relative).

ShardFeed is the rank's cache observer: it does not predict (the forecast is made once, on rank 0, from the
replicated routing, and arrives with the layer's command, columns of this rank's experts only) and does not see
the decoder's steps (the command says whether the step decodes).
"""
from __future__ import annotations

import torch

from ..experts.cache import PredictorFeed
from ..model.decoder import Decoder
from ..runtime.build import bind_experts, build_cache, decode_ops, linear_kernel
from .placement import ExpertPlacement, ShardCheckpoint


class ShardFeed(PredictorFeed):
    """The forecast rank 0 sent for this layer, in local expert ids; the decode flag of the step."""

    def __init__(self, feed: PredictorFeed, forecaster=None):
        super().__init__(forecaster, feed.controller, feed.counters)

    def begin(self, decoding: bool) -> None:
        self.counters.decoding = decoding

    def give(self, forecast: dict[int, torch.Tensor]) -> None:
        self._predictions = forecast

    def begin_step(self, token_ids, seq_ids) -> None:
        """Not registered with a decoder: the layer's command carries the step (see begin)."""

    def observe(self, layer, router_input, experts, weights) -> None:
        """Not registered with a decoder: the forecast comes from rank 0 (see give)."""


class Shard:
    """Rank `view.rank`'s experts: a cache over its ShardCheckpoint and one strategy per MoE layer."""

    def __init__(self, view: ShardCheckpoint, placement: ExpertPlacement, plan, dtype: torch.dtype,
                 device: torch.device, offload, kernels, progress: bool):
        rank = view.rank
        self.rank, self.placement, self.device, self.view = rank, placement, device, view
        # layer -> {model id: local id} of this rank's experts (hints and prefetches arrive in model ids)
        self.index = {m: {e: i for i, e in enumerate(placement.experts_of(rank, m))} for m in placement.owned}
        self.tables = {m: (mine.to(device), local.to(device)) for m, (mine, local) in placement.tables(rank).items()}
        # columns of the model's [N, E] forecast scores that are this rank's experts, in local order
        self.columns = {m: torch.tensor(placement.experts_of(rank, m), device=device) for m in placement.owned}
        self.plan = plan
        shadow = _shadow_decoder(self.view.spec, dtype, device, kernels)
        self.cache = build_cache(self.view, shadow, plan, dtype, device, offload, None, progress)
        bind_experts(shadow, self.cache, None, kernels.quant)
        self.strategies = {b.layer: b.experts for b in shadow.moe_blocks()}
        feed = getattr(self.cache, "observer", None)
        self.feed = ShardFeed(feed) if isinstance(feed, PredictorFeed) else None
        if self.feed is not None:
            self.cache.observer = self.feed

    def begin(self, decoding: bool) -> None:
        if self.feed is not None:
            self.feed.begin(decoding)

    def hint(self, experts: dict[int, frozenset[int]]) -> None:
        """A hint in the model's expert ids -> this rank's cache, in local ids."""
        self.cache.hint_upcoming(self._local(experts))

    def prefetch(self, experts: dict, keep: dict | None) -> int:
        """Start loading the forecast experts this rank owns (model ids), never evicting `keep`'s; loads started."""
        prefetch = getattr(self.cache, "prefetch", None)          # a resident cache has nothing to load
        if prefetch is None:
            return 0
        return prefetch(self._local(experts), None if keep is None else self._local(keep))

    def _local(self, experts: dict) -> dict[int, frozenset[int]]:
        return {m: frozenset(index[e] for e in ids if e in index)
                for m, ids in experts.items() if (index := self.index.get(m)) is not None}

    def residents(self, layer: int) -> frozenset[int]:
        """The model's ids of this rank's resident experts of `layer`."""
        own = self.placement.experts_of(self.rank, layer) if layer in self.placement.owned else ()
        return frozenset(own[e] for e in self.cache.residents(layer))

    def compute(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                forecast: dict[int, torch.Tensor]) -> torch.Tensor:
        """This rank's part of the layer's routed output, float32 [N, D] (zeros where it owns none of a token's)."""
        mine, local = self.tables[layer]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        tok, slot = mine[ids].nonzero(as_tuple=True)                          # [P] pairs this rank computes
        if self.feed is not None:
            self.feed.give({m: s[:, self.columns[m]] for m, s in forecast.items()})
        if tok.numel() == 0:
            if self.cache.evicts:   # idle here, still a layer pass: the forecast's prefetches start, the step counts
                self.cache.fetch(layer, [], [])
            return out
        y = self.strategies[layer](layer, x[tok], weights[tok, slot][:, None], local[ids[tok, slot]][:, None])
        return out.index_add_(0, tok, y.float())                              # [P, D] weighted already


def _shadow_decoder(spec, dtype: torch.dtype, device: torch.device, kernels) -> Decoder:
    """A decoder without weights (meta tensors) whose MoE blocks give bind_experts the layer's layout, activation,
    matmul kernel and decode ops: the strategies it binds are those one process would use."""
    with torch.device("meta"):
        decoder = Decoder(spec).cast(dtype)
    decoder.set_linear_kernel(linear_kernel(kernels, dtype, device))
    decoder.set_decode_ops(decode_ops(kernels, dtype, device))
    return decoder
