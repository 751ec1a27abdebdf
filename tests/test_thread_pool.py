"""The C thread pool's straggler guard (csrc/thread_pool.h): a team whose caller keeps waiting for a descheduled
worker is capped one thread smaller, probed with the full team every PROBE_NS, and restored when on time; and
kernels give the same results whatever the team (so a cap never changes outputs)."""
from __future__ import annotations

import pytest
import torch

from moe_engine import _ops

pytestmark = pytest.mark.skipif(not _ops.HAS_C_EXT, reason=f"moe_engine._C not loaded: {_ops.C_EXT_ERROR}")


def _guard():
    return _ops._C.StragglerGuard()


def test_late_runs_cap_the_team_after_the_strikes():
    g, late, t = _guard(), _ops._C.StragglerGuard.LATE_NS + 1, 0
    for i in range(_ops._C.StragglerGuard.STRIKES - 1):
        assert g.team_for(2, t) == (2, False)
        g.judge(2, late, False, t)
    assert g.cap == 0
    g.judge(2, 10, False, t)                                        # an on-time run resets the strikes
    for i in range(_ops._C.StragglerGuard.STRIKES - 1):
        g.judge(2, late, False, t)
    assert g.cap == 0
    g.judge(2, late, False, t)
    assert g.cap == 1
    assert g.team_for(2, t + 1) == (1, False)                      # capped until the probe time
    assert g.team_for(4, t + 1) == (1, False)


def test_probe_restores_the_full_team_when_on_time_and_backs_off_when_not():
    g, late, probe = _guard(), _ops._C.StragglerGuard.LATE_NS + 1, _ops._C.StragglerGuard.PROBE_NS
    for _ in range(_ops._C.StragglerGuard.STRIKES):
        g.judge(3, late, False, 0)
    assert g.cap == 2
    assert g.team_for(3, probe) == (3, True)                        # probe time: the full team once
    g.judge(3, late, True, probe)                                   # still late: stay capped, probe later
    assert g.cap == 2 and g.team_for(3, probe + 1) == (2, False)
    assert g.team_for(3, 2 * probe) == (3, True)
    g.judge(3, 1000, True, 2 * probe)                               # on time: restored
    assert g.cap == 0 and g.team_for(3, 2 * probe + 1) == (3, False)


def test_on_time_runs_never_cap():
    g = _guard()
    for t in range(100):
        g.judge(2, _ops._C.StragglerGuard.LATE_NS, False, t)      # at the threshold is on time
    assert g.cap == 0 and g.team_for(2, 100) == (2, False)


def test_pool_counters_and_team_independent_results():
    counters = _ops._C.pool_counters()
    assert set(counters) == {"cap", "capped_runs", "probes"} and counters["cap"] >= 0
    w = torch.randn(512, 256).bfloat16()
    x = torch.randn(3, 256).bfloat16()
    one = _ops.bf16_linear(x, w, backend="c", num_threads=1)
    assert torch.equal(one, _ops.bf16_linear(x, w, backend="c", num_threads=2))
