"""Expert providers: where routed experts live and how they reach the compute device."""
from .resident import ResidentExperts

__all__ = ["ResidentExperts"]
