"""PrefetchGate: which predicted experts are prefetched and when a prefetch may evict (decisions only)."""
from __future__ import annotations

import pytest
import torch

from moe_engine.experts.policies import make_policy
from moe_engine.experts.prefetch_gate import MIN_PRECISION, PrefetchGate, worth_evicting
from moe_engine.experts.table import SlotTable


@pytest.mark.parametrize("p, distance, load_s, layer_s, ok", [
    (0.69, 4, None, None, False),          # below MIN_PRECISION: never
    (0.75, 1, None, None, True),           # no timing yet: precision alone
    (0.75, 1, 1e-4, 3e-4, True),           # load shorter than a layer: hides all of it, 0.75 >= 0.25
    (0.75, 1, 14e-3, 2.5e-3, False),       # 14 ms read, 2.5 ms to hide: 1.9 ms < 3.5 ms wasted
    (0.75, 4, 14e-3, 2.5e-3, True),        # four layers ahead: 7.5 ms hidden >= 3.5 ms
    (0.95, 1, 14e-3, 2.5e-3, True),        # 2.4 ms >= 0.7 ms
])
def test_worth_evicting(p, distance, load_s, layer_s, ok):
    assert worth_evicting(p, distance, load_s, layer_s) is ok


def _full_table() -> SlotTable:
    table = SlotTable([0, 2], 8, make_policy("lru"))
    for e in (0, 1):
        table.place(1, e, 0)
    table.lookup(1, [0, 1], 0)
    return table


def _scores(*experts: int) -> torch.Tensor:
    s = torch.zeros(1, 8)
    s[0, list(experts)] = 1.0
    return s


def test_issue_evicts_only_when_it_pays_and_scores_fresh_guesses():
    gate, issued = PrefetchGate(2, top_k=2), []
    submit = lambda target, e, placed, d: issued.append((target, e, placed[1], d))   # noqa: E731
    table = _full_table()
    gate.precision[1] = 0.75
    gate.issue(0, {1: _scores(0, 5)}, table, 1, lambda t: set(), submit, load_s=14e-3, layer_s=2.5e-3)
    assert issued == []                                  # 5 would evict 1: a 14 ms read to hide 2.5 ms
    gate.issue(0, {1: _scores(0, 5)}, table, 1, lambda t: set(), submit, load_s=1e-4, layer_s=3e-4)
    assert issued == [(1, 5, 1, 1)]                      # cheap read: prefetched, evicting 1 (0 is wanted)
    gate.score(1, [0, 6])                                # scored guess: {5} only, 0 was already resident
    assert gate.precision[1] == pytest.approx(0.9 * 0.75)      # with 0 counted it would be 0.725
    assert gate.precision[1] < MIN_PRECISION             # a wrong guess closed the gate ...
    issued.clear()
    table.remove(1, 5)                                   # ... except into a free slot
    gate.new_step()
    gate.issue(0, {1: _scores(0, 7)}, table, 2, lambda t: set(), submit)
    assert issued == [(1, 7, None, 1)]
    table.remove(1, 7)
    table.place(1, 2, 3)
    gate.issue(0, {1: _scores(0, 7)}, table, 3, lambda t: set(), submit)
    assert issued == [(1, 7, None, 1)]                   # full again and gated: nothing more


def test_an_untried_predictor_earns_evicting_prefetches():
    """Precision starts below the gate: no eviction until enough scored guesses were right."""
    gate, issued = PrefetchGate(2, top_k=2), []
    submit = lambda target, e, placed, d: issued.append((target, e))   # noqa: E731
    table = _full_table()
    gate.issue(0, {1: _scores(0, 5)}, table, 1, lambda t: set(), submit)
    assert issued == []                                  # a full layer, nothing scored yet: gated
    rounds = 0
    while gate.precision[1] < MIN_PRECISION:             # the guess {5} comes true each step
        gate.score(1, [0, 5])
        rounds += 1
        gate.new_step()
        gate.issue(0, {1: _scores(0, 5)}, table, 1 + rounds, lambda t: set(), submit)
    assert issued == [(1, 5)]                            # the first step after the gate opened
    assert rounds == 2                                   # PRIOR_PRECISION 0.65 -> 0.685 -> 0.717
