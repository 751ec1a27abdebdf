"""The lookahead clock: moving averages of one load's time, one layer pass's compute and loads per layer pass.

The cache controller reads it to choose how far ahead to prefetch (CacheController.lookahead) and hands
its load and layer times to the prefetch gate (worth_evicting). Time comes from `now`, the transport's
clock: wall-clock seconds for the live cache (the loader threads measure each job), modelled seconds in
the simulator, so both run the same arithmetic.
"""
from __future__ import annotations

from collections.abc import Callable


class LookaheadClock:
    def __init__(self, now: Callable[[], float], decay: float = 0.9):
        self.now = now
        self.decay = decay
        self.load_s: float | None = None          # one expert's load
        self.layer_s: float | None = None         # one layer pass, stalls excluded
        self.loads_per_layer = 0.0
        self._t0: float | None = None
        self._stall0 = 0.0
        self._issued = 0

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def layer_start(self, new_step: bool, stall_total: float) -> None:
        now = self.now()
        if self._t0 is not None and not new_step:     # the previous layer of this step just ended
            self.layer_s = self._avg(self.layer_s, max(now - self._t0 - (stall_total - self._stall0), 0.0))
        if self._t0 is not None:
            self.loads_per_layer = self._avg(self.loads_per_layer, self._issued)
        self._t0, self._stall0, self._issued = now, stall_total, 0

    def issued(self) -> None:
        self._issued += 1

    def loaded(self, seconds: float) -> None:
        if seconds > 0:
            self.load_s = self._avg(self.load_s, seconds)

    def stats(self) -> dict:
        return {"load_seconds": self.load_s or 0.0, "layer_seconds": self.layer_s or 0.0,
                "loads_per_layer": self.loads_per_layer}
