"""Expert caches: where routed experts live and how they reach the compute device.

Every cache has two faces, both set up once when the engine is built (runtime/build.py):

    to the model    ExpertSource (model/experts.py): fetch(layer, experts, counts) -> LayerFetch
    to the runtime  ExpertCache (below): steer it (hint_upcoming, prefetch), read it (residents, quotas, stats,
                    nbytes; ready and peeking for speculative drafts), its routing observer (the predictor feed,
                    registered first), close()

resident.py     every expert on the compute device (no budget)
cache.py        the offloading cache = controller.py (every decision, over ids: lookup, demand or defer,
                prefetch, eviction, compute order; ledger.py: the loads in flight, clock.py: the lookahead
                clock) + loader.py (IO threads: the controller's transport) + storage.py (the slots)
host.py         the host-RAM tier a GPU copies from; costmodel.py: copy a miss or compute it on the host
plan.py         how --gpu-mem / --cpu-mem split into weights, KV reserve, IO buffers and expert slots
table.py, policies.py, policy_default.py, prefetch_gate.py, tracker.py: the slot table, eviction policies,
                prefetch decisions and counters, shared with the offloading simulator (profiling/simulate.py,
                which runs the same CacheController over a modelled link)
"""
from __future__ import annotations

from typing import Protocol

from .cache import OffloadedExperts
from .resident import ResidentExperts


class ExpertCache(Protocol):
    """The runtime's view of whoever holds the routed experts (ResidentExperts, OffloadedExperts)."""

    buffers_stable: bool                 # see model.experts.ExpertSource
    evicts: bool                         # False: every expert is resident, hints and residency change nothing
    observer: object                     # a RoutingObserver to register first, or None
    policy_name: str | None              # the eviction policy (None: nothing is evicted)
    quotas: list[int]                    # expert slots per decoder layer (0 for dense layers)
    capacity_experts: int

    def fetch(self, layer: int, experts, counts): ...

    def residents(self, layer: int) -> frozenset[int]: ...

    def hint_upcoming(self, experts: dict[int, frozenset[int]]) -> None: ...

    def ready(self, layer: int) -> frozenset[int]:
        """Resident experts readable as they are (no load writing their slot): what a restricted draft may use."""

    def peeking(self):
        """A context in which fetch() reads ready experts without counting a lookup (speculative drafting)."""

    def prefetch(self, experts: dict[int, frozenset[int]], keep: dict[int, frozenset[int]] | None = None) -> int:
        """Start loads of a coming step's forecast experts {layer: experts}, never evicting `keep`; returns how many
        started."""

    def stats(self) -> dict:
        """The cache / prefetch / io / optimal (/ prediction) sections of Engine.stats()."""

    def nbytes(self) -> int:
        """Bytes the cache holds on the compute tier (slots, staging buffers)."""

    def close(self) -> None: ...


__all__ = ["ExpertCache", "OffloadedExperts", "ResidentExperts"]
