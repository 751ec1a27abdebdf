"""The offloading cache: outputs never depend on budget, policy or predictor; stats add up; bad input."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import threading

import pytest
import torch

import moe_engine
from moe_engine.checkpoint import Checkpoint
from moe_engine.errors import ConfigError, ExpertReadError
from moe_engine.experts import OffloadedExperts
from moe_engine.experts.costmodel import CostModel
from moe_engine.experts.host import HostTier
from moe_engine.experts.loader import DEMAND, Loader, LoadJob
from moe_engine.experts.plan import make_plan
from moe_engine.experts.policies import make_policy
from moe_engine.experts.tracker import belady_loads
from moe_engine.profiling.belady import belady_slow
from moe_engine.runtime.build import bind_experts, build_decoder, non_expert_bytes
from moe_engine.runtime.load import DEFAULT_MODEL_DIR

IDS = torch.tensor([[5, 77, 300, 12, 9, 1000, 44, 3, 871, 64, 2, 15]])


def minimum_budget(model_dir=None, dtype=torch.float32) -> int:
    """The smallest --gpu-mem the engine accepts, read from its own error message."""
    with pytest.raises(ConfigError) as err:
        moe_engine.load(model_dir, dtype="float32", gpu_mem=1, progress=False)
    text = str(err.value)
    assert "raise gpu_mem to at least" in text                # load()'s keyword, not the CLI flag
    return int(text.split("(")[-1].split(" bytes")[0])


@pytest.fixture(scope="module")
def reference():
    eng = moe_engine.load(None, dtype="float32", progress=False)
    out = (eng.logits(IDS), eng.generate(IDS, max_new_tokens=24))
    eng.close()
    return out


@pytest.fixture(scope="module")
def min_budget():
    return minimum_budget()


@pytest.mark.parametrize("policy", ["lru", "lfu", None])
@pytest.mark.parametrize("extra_slots", [0, 7, 40])
@pytest.mark.parametrize("predictor", ["gate-lookahead", None])
def test_outputs_identical_whatever_budget_policy_predictor(reference, min_budget, policy, extra_slots, predictor):
    slot = 3 * 192 * 128 * 4
    eng = moe_engine.load(None, dtype="float32", gpu_mem=min_budget + extra_slots * slot, policy=policy,
                          predictor=predictor, progress=False)
    logits = eng.logits(IDS)
    tokens = eng.generate(IDS, max_new_tokens=24)
    stats = eng.stats()
    eng.close()
    assert torch.allclose(logits, reference[0], atol=1e-5, rtol=0)
    assert torch.equal(tokens, reference[1])
    cache, io, opt = stats["cache"], stats["io"], stats["optimal"]
    assert cache["misses"] > 0 and io["loads"] >= cache["misses"]           # a tight budget has to load
    assert opt["belady_loads"] <= io["loads"]                                # nobody beats Belady
    assert cache["capacity_experts"] < 96
    # memory under the budget is measured (peak RSS of a fresh process): test_hardening.py's test_measured_peak_*


def test_batched_generation_matches_unbudgeted(min_budget):
    prompts = ["def main():", "import os\nimport", "class Cache:\n    def"]
    ref = moe_engine.load(None, dtype="float32", progress=False)
    want = ref.generate(prompts, max_new_tokens=16)
    ref.close()
    eng = moe_engine.load(None, dtype="float32", gpu_mem=min_budget, progress=False)
    assert eng.generate(prompts, max_new_tokens=16) == want
    eng.close()


def test_budget_errors_name_the_flag_and_minimum(min_budget):
    with pytest.raises(ConfigError, match="gpu_mem"):
        moe_engine.load(None, gpu_mem="lots", progress=False)
    with pytest.raises(ConfigError, match="at least"):
        moe_engine.load(None, dtype="float32", gpu_mem=min_budget - 1, progress=False)
    with pytest.raises(ConfigError, match="cache policy 'fifo' is unknown; available"):
        moe_engine.load(None, policy="fifo", progress=False)
    eng = moe_engine.load(None, dtype="float32", gpu_mem=min_budget, progress=False)
    with pytest.raises(ConfigError, match="KV cache for"):
        eng.generate(["x"] * 4, max_new_tokens=1000)
    eng.close()


def test_placement_plan_is_printed(capsys, min_budget):
    eng = moe_engine.load(None, dtype="float32", gpu_mem=min_budget, progress=True)
    err = capsys.readouterr().err
    eng.close()
    assert "placement plan (cpu" in err and "slots per layer: 2 2 2 2 2 2" in err
    assert "--gpu-mem" in err and "reachable only from disk" in err


def test_truncated_checkpoint_mid_run_gives_clear_error_and_no_corrupt_expert(tmp_path, reference):
    model = tmp_path / "tiny"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    budget = minimum_budget(model)
    eng = moe_engine.load(model, dtype="float32", gpu_mem=budget, predictor=None, progress=False)
    assert torch.equal(eng.generate(IDS, max_new_tokens=4), reference[1][:, : IDS.shape[1] + 4])
    weights = model / "model.safetensors"
    saved = weights.read_bytes()
    os.truncate(weights, len(saved) // 3)
    with pytest.raises(ExpertReadError, match="model.safetensors changed since this engine loaded it .*truncated"):
        for _ in range(4):
            eng.generate(IDS, max_new_tokens=24)
    weights.write_bytes(saved)        # put back: the engine cannot tell it is the same, so it keeps refusing
    with pytest.raises(ExpertReadError, match="changed since this engine loaded it"):
        eng.generate(IDS, max_new_tokens=24)
    eng.close()
    eng = moe_engine.load(model, dtype="float32", gpu_mem=budget, predictor=None, progress=False)
    assert torch.equal(eng.generate(IDS, max_new_tokens=24), reference[1])   # a new engine reads it afresh
    eng.close()


def test_hybrid_host_tier_path_gives_identical_outputs(reference):
    """The GPU code path's logic, on the CPU: a host tier holding every expert, misses run on the host."""
    ckpt = Checkpoint(DEFAULT_MODEL_DIR)
    dev, dt = torch.device("cpu"), torch.float32
    plan = make_plan(ckpt.spec, dev, dt, non_expert_bytes(ckpt, dt), 64 << 20, None, io_threads=2)
    quotas = [2 if q else 0 for q in plan.quotas]
    plan = dataclasses.replace(plan, quotas=quotas, device_slots=sum(quotas), host_slots=plan.total_experts)
    for host_compute, host_slots in ((True, plan.total_experts), (False, plan.total_experts), (False, 24)):
        host = HostTier(ckpt, dataclasses.replace(plan, host_slots=host_slots), dt, dev, pinned=False,
                        progress=False)
        cost = CostModel(h2d_bytes_per_s=1.0 if host_compute else 1e30, cpu_flops_per_s=1e12)
        provider = OffloadedExperts(ckpt, plan, dt, dev, make_policy("lru"), host=host, cost_model=cost)
        read_at_start = host.bytes_disk_read
        decoder = build_decoder(ckpt, dt, dev, progress=False)      # a decoder is bound to one cache, once
        bind_experts(decoder, provider)
        engine = moe_engine.Engine(ckpt, decoder, provider, None, dev, dt)
        assert torch.allclose(engine.logits(IDS), reference[0], atol=1e-5, rtol=0)
        stats = provider.stats()
        assert (stats["io"]["loads"] == 0) == host_compute     # host compute moves no expert
        more_reads = stats["io"]["bytes_disk_read"] > read_at_start
        assert more_reads == (host_slots < plan.total_experts)      # a full host tier never reads again
        provider.close()
    ckpt.close()


def test_loader_demand_preempts_prefetch_and_cancel_drops_stale():
    gate, ran = threading.Event(), []

    def work(job, worker):
        gate.wait()
        ran.append((job.layer, job.expert))
    loader = Loader(work, num_workers=1)
    first = loader.submit(LoadJob(0, 0, 0, DEMAND))          # occupies the only worker
    pre = [loader.submit(LoadJob(1, e, e, 1, prefetch=True)) for e in range(3)]
    demand = loader.submit(LoadJob(2, 9, 9, DEMAND))
    assert loader.cancel(pre[1]) and pre[1].done.is_set()
    loader.promote(pre[2])
    gate.set()
    for job in (first, demand, pre[0], pre[2]):
        assert job.done.wait(5)
    loader.close()
    assert ran == [(0, 0), (2, 9), (1, 2), (1, 0)]            # demand, then promoted, then prefetch; (1,1) never


def test_loader_failure_reaches_the_waiter():
    def work(job, worker):
        raise OSError("disk on fire")
    loader = Loader(work, num_workers=2)
    job = loader.submit(LoadJob(0, 1, 0, DEMAND))
    assert job.done.wait(5) and job.state == "failed" and "disk on fire" in str(job.error)
    loader.close()


def test_engine_belady_matches_reference_on_top_k_steps():
    rng = random.Random(0)
    for _ in range(40):
        n_experts, k = rng.randint(3, 10), rng.randint(1, 3)
        steps = [rng.sample(range(n_experts), k) for _ in range(rng.randint(1, 40))]
        cap = rng.randint(k, n_experts)
        assert belady_loads(steps, cap) == belady_slow(steps, cap)


def test_engine_belady_handles_steps_larger_than_the_cache():
    assert belady_loads([[0, 1, 2, 3]], 2) == 4
    assert belady_loads([[0, 1, 2, 3], [3]], 2) == 4          # the last computed stays
    assert belady_loads([[0, 1], [2, 3], [0, 1]], 2) == 6


def test_routing_log_stays_bounded_and_belady_folds_windows(monkeypatch):
    """A long-running server: the log never holds more than a window per layer; the folded Belady total is
    at least the exact one and exceeds it by at most the quota per window boundary."""
    from moe_engine.experts import tracker
    from moe_engine.experts.table import SlotTable
    monkeypatch.setattr(tracker, "LOG_WINDOW", 50)
    rng = random.Random(3)
    steps = [rng.sample(range(8), 2) for _ in range(230)]
    quota = 3
    counters = tracker.CacheCounters(1, [quota])
    table = SlotTable([quota], 8, make_policy("lru"))
    for t, need in enumerate(steps):
        counters.accessed(0, t, need)
        assert len(counters.log[0]) < 50
        table.lookup(0, need, t)
    folded = counters.sections(table, 0)["optimal"]["belady_loads"]
    exact = belady_loads(steps, quota)
    assert exact <= folded <= exact + quota * (230 // 50)
    assert sum(belady_loads(steps[i:i + 50], quota) for i in range(0, 230, 50)) == folded


def test_plan_splits_the_budget_exactly():
    ckpt = Checkpoint(DEFAULT_MODEL_DIR)
    dev, dt = torch.device("cpu"), torch.float32
    rest = non_expert_bytes(ckpt, dt)
    full = make_plan(ckpt.spec, dev, dt, rest, None, None)
    assert full.all_resident and full.device_slots == 96 and "all experts resident" in full.describe()
    previous = 0
    for extra in (0, 1, 5, 13, 40, 200):
        budget = full.device_bytes - full.device_slots * full.slot_bytes + (12 + extra) * full.slot_bytes
        plan = make_plan(ckpt.spec, dev, dt, rest, budget, None)
        assert plan.device_slots == sum(plan.quotas) == min(12 + extra, 96)
        assert plan.device_bytes <= budget and plan.device_slots >= previous
        assert all(2 <= q <= 16 for q in plan.quotas)
        previous = plan.device_slots
    gpu = make_plan(ckpt.spec, torch.device("cuda"), dt, rest, budget, 10 * full.slot_bytes + (8 << 20) + 4096)
    assert gpu.host_slots == 10 and "host tier (RAM): 10 experts" in gpu.describe()
    ckpt.close()
