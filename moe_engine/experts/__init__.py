"""Expert providers: where routed experts live and how they reach the compute device.

resident.py   every expert on the compute device (no budget)
cache.py      the offloading cache: compute-tier slots, loader threads, prefetch (plan.py splits budgets)
"""
from .cache import OffloadedExperts
from .resident import ResidentExperts

__all__ = ["OffloadedExperts", "ResidentExperts"]
