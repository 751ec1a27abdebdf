"""Continuous batching (runtime/loop.py): sequences that join and leave between steps give the same
tokens as when run alone, whatever the scheduler, step size or budget; cancel and queue limits."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import moe_engine
from moe_engine.errors import ConfigError
from moe_engine.runtime.loop import QueueFull, Request
from moe_engine.runtime.loop import EngineLoop
from moe_engine.runtime.sampling import SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(", "# sum a list", "return x +",
           "with open(", "print(\"hello"]


def collect(loop: EngineLoop, prompts: list[list[int]], max_tokens, sampling=None, stop=()):
    done, out, events = threading.Event(), {}, {}
    lock = threading.Lock()

    def on_event(i):
        def f(ev):
            with lock:
                events.setdefault(i, []).append(ev)
                if ev.finish_reason is not None:
                    out[i] = ev
                    if len(out) == len(prompts):
                        done.set()
        return f
    for i, ids in enumerate(prompts):
        n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        loop.submit(Request(ids, n, sampling or SamplingParams(do_sample=False), on_event(i), stop=list(stop)))
    assert done.wait(120), f"only {len(out)} of {len(prompts)} finished"
    return events


@pytest.fixture(scope="module")
def eng():
    e = moe_engine.load(dtype="float32", progress=False)
    yield e
    e.close()


@pytest.mark.parametrize("scheduler,max_batch", [("fifo", None), ("fifo", 3), ("expert", 3)])
def test_joined_sequences_match_running_alone(eng, scheduler, max_batch):
    ids = [eng.encode(p) for p in PROMPTS]
    lengths = [5, 9, 3, 12, 7, 4, 10, 6]                     # sequences finish and leave at different steps
    loop = EngineLoop(eng, max_num_seqs=5, max_batch=max_batch, scheduler=scheduler).start()
    try:
        events = collect(loop, ids, lengths)
    finally:
        loop.shutdown()
    for i, row in enumerate(ids):
        want = eng.generate(PROMPTS[i], max_new_tokens=lengths[i], do_sample=False)
        got = events[i]
        assert [e.finish_reason for e in got[:-1]] == [None] * (len(got) - 1)
        assert "".join(e.text for e in got) == want
        assert sum(len(e.token_ids) for e in got) == got[-1].completion_tokens <= lengths[i]
        assert got[-1].prompt_tokens == len(row)
    assert loop.counters()["kv_reserved"] == 0 and loop.counters()["running"] == 0


def test_offloaded_engine_under_a_budget_and_seeded_sampling(tmp_path):
    eng = moe_engine.load(dtype="float32", gpu_mem="22M", max_kv_tokens=512, progress=False)
    assert eng.stats()["cache"]["capacity_experts"] < 96
    ids = [eng.encode(p) for p in PROMPTS[:4]]
    sampling = SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    loop = EngineLoop(eng, max_num_seqs=4, max_batch=2, scheduler="expert").start()
    try:
        events = collect(loop, ids, 8, sampling)
    finally:
        loop.shutdown()
    for i, p in enumerate(PROMPTS[:4]):
        assert "".join(e.text for e in events[i]) == eng.generate(p, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9,
                                                                   seed=7)
    eng.close()


def test_grouped_prefills_and_schedule_aware_eviction_keep_outputs():
    """Expert scheduling under a budget: admission held for fuller prefill groups, the cache told the next
    group's experts; every request still gets its lone-run text, and prompts were prefilled in fewer steps."""
    eng = moe_engine.load(dtype="float32", gpu_mem="22M", max_kv_tokens=512, progress=False)
    hints = []
    real_hint = eng.experts.hint_upcoming
    eng.experts.hint_upcoming = lambda experts: (hints.append(experts), real_hint(experts))
    ids = [eng.encode(p) for p in PROMPTS]
    lengths = [6, 3, 9, 4, 7, 3, 5, 8]
    prefills = {}
    for wait in (0, 6):
        loop = EngineLoop(eng, max_num_seqs=4, max_batch=2, max_prefill=4, scheduler="expert",
                          prefill_wait=wait).start()
        try:
            events = collect(loop, ids, lengths)
        finally:
            loop.shutdown()
        prefills[wait] = loop.counters()["prefills"]
        for i, p in enumerate(PROMPTS):
            assert "".join(e.text for e in events[i]) == eng.generate(p, max_new_tokens=lengths[i], do_sample=False)
    assert prefills[6] < prefills[0]
    assert hints and all(set(h) == set(eng.spec.moe_layers) for h in hints)
    assert any(any(v) for h in hints for v in h.values())
    eng.close()


def test_stop_strings_cancel_and_queue_limit(eng):
    loop = EngineLoop(eng, max_num_seqs=1, max_waiting=2, scheduler="fifo").start()
    try:
        events = collect(loop, [eng.encode("def fibonacci(n):")], 30, stop=["\n"])
        text = "".join(e.text for e in events[0])
        assert "\n" not in text and events[0][-1].finish_reason == "stop"
        gate = threading.Event()
        seen = []

        def slow(ev):
            seen.append(ev)
            gate.wait(5)
        loop.submit(Request(eng.encode("import os"), 200, SamplingParams(do_sample=False), slow, request_id="a"))
        for _ in range(500):                 # "a" runs (its first event is held by `slow`) before the queue fills
            if seen:
                break
            time.sleep(0.01)
        loop.submit(Request(eng.encode("import os"), 5, SamplingParams(do_sample=False), seen.append,
                            request_id="b"))
        loop.submit(Request(eng.encode("import os"), 5, SamplingParams(do_sample=False), seen.append,
                            request_id="c"))
        with pytest.raises(QueueFull):
            loop.submit(Request([5], 5, SamplingParams(do_sample=False), seen.append))
        loop.cancel("a")
        gate.set()
        assert loop.drain(60)
    finally:
        loop.shutdown()
    finals = {e.request_id: e.finish_reason for e in seen if e.finish_reason}
    assert finals == {"a": "abort", "b": "length", "c": "length"}
    assert loop.counters()["kv_reserved"] == 0
    with pytest.raises(ValueError, match="KV cache"):
        EngineLoop(eng, max_num_seqs=1, kv_tokens=64).submit(Request([5] * 60, 10, SamplingParams(), print))


@pytest.mark.parametrize("scheduler", ["expert", "fifo"])
def test_offline_generate_with_max_batch_matches_the_padded_batch(eng, scheduler):
    want = eng.generate(PROMPTS, max_new_tokens=10, do_sample=False, stop=["\n\n"])
    got = eng.generate(PROMPTS, max_new_tokens=10, do_sample=False, stop=["\n\n"], max_batch=3, scheduler=scheduler)
    assert got == want
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.9, seed=11)
    assert eng.generate(PROMPTS[:4], max_batch=2, **kw) == eng.generate(PROMPTS[:4], **kw)   # row i: seed + i
    ids = torch.tensor([eng.encode("def f(x):")])
    assert torch.equal(eng.generate(ids, max_new_tokens=5, max_batch=1), eng.generate(ids, max_new_tokens=5))


def test_offline_generate_bad_arguments(eng):
    with pytest.raises(ConfigError, match="max_batch=0"):
        eng.generate(PROMPTS[:2], max_batch=0)
    with pytest.raises(ConfigError, match="scheduler='lifo'"):
        eng.generate(PROMPTS[:2], max_batch=2, scheduler="lifo")


def test_bf16_decode_reads_each_sequence_cache_in_place(monkeypatch):
    """bf16 on the CPU: decode steps of the loop attend over each sequence's own KV cache (StepKV.rows, no gather
    through update) and every sequence's text equals its run alone."""
    from moe_engine.runtime import kv_cache
    eng = moe_engine.load(dtype="bfloat16", progress=False)
    if eng.decoder.layers[0].attn.ops is None:
        pytest.skip("no decode ops (moe_engine._C not loaded)")
    calls = {"rows": 0, "update_t1": 0}
    rows, update = kv_cache.StepKV.rows, kv_cache.StepKV.update

    def counted_rows(self, *a):
        calls["rows"] += 1
        return rows(self, *a)

    def counted_update(self, layer, k, v):
        calls["update_t1"] += k.shape[2] == 1
        return update(self, layer, k, v)
    monkeypatch.setattr(kv_cache.StepKV, "rows", counted_rows)
    monkeypatch.setattr(kv_cache.StepKV, "update", counted_update)
    ids = [eng.encode(p) for p in PROMPTS[:5]]
    lengths = [6, 3, 9, 5, 7]
    loop = EngineLoop(eng, max_num_seqs=5, max_batch=4, scheduler="fifo").start()
    try:
        events = collect(loop, ids, lengths)
    finally:
        loop.shutdown()
    assert calls["rows"] > 0 and calls["update_t1"] == 0
    for i, p in enumerate(PROMPTS[:5]):
        assert "".join(e.text for e in events[i]) == eng.generate(p, max_new_tokens=lengths[i], do_sample=False)
    eng.close()
