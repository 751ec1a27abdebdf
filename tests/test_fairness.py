"""Fair sharing of the engine's steps (runtime/batching.py over scheduling/fairness.py), float32, bundled model.

Chunked prefill under a token budget gives the logits (1e-5) and greedy tokens of one whole prefill; every step
stays within the budget and decodes are never starved; prefill takes its time share and no more while others
decode; a client over its seat cap yields seats and rows (its preempted sequences recomputed, same tokens); a
routing-diverse row waits while others run; with every expert resident "expert" schedules exactly as "fifo";
the server tells clients apart.
"""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import moe_engine
from moe_engine.errors import ConfigError
from moe_engine.runtime.batching import Batcher
from moe_engine.runtime.loop import EngineLoop, Request
from moe_engine.runtime.sampling import SamplingParams

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def eng():
    e = moe_engine.load(dtype="float32", progress=False)
    yield e
    e.close()


@pytest.fixture(scope="module")
def texts(eng):
    """Prompts of 3 to ~90 ids from the bundled calibration text."""
    from moe_engine.quant.settings import DEFAULT_CALIBRATION
    words = DEFAULT_CALIBRATION.read_text().split()
    return [eng.encode(" ".join(words[i * 40: i * 40 + n])) for i, n in enumerate([2, 70, 9, 45, 25, 5, 60, 14])]


def seqs_for(eng, prompts, max_new):
    news = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
    return [eng.core.sequence(p, n, GREEDY, eng.eos_ids(None)) for p, n in zip(prompts, news)]


def drive(b: Batcher, seqs, clients=None, on_plan=None):
    """Run every sequence to its end through `b`; on_plan(plan) sees each step's plan before it runs."""
    for i, s in enumerate(seqs):
        b.enqueue(s, clients[i] if clients else None)
    obs = b.core.observing(b.observer) if b.observer is not None else contextlib.nullcontext()
    with obs:
        while b.waiting or b.running:
            plan = b.plan()
            if on_plan is not None:
                on_plan(plan)
            assert plan.chunks or plan.decode, "a step with nothing to do"
            for step, arg in ((b.prefill, plan.chunks), (b.decode, plan.decode)):
                if arg:
                    for seq, _ in step(arg):
                        if seq.done:
                            b.release(seq)
    return [s.generated for s in seqs]


@pytest.fixture(scope="module")
def alone(eng, texts):
    """Each prompt's greedy tokens from one whole prefill, run alone (lockstep, the plain generate path)."""
    out = []
    for p in texts:
        ids = eng.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
        s = seqs_for(eng, [p], 10)[0]
        drive(Batcher(eng.core, eng.experts, 1), [s])
        assert s.generated == ids[:len(s.generated)]
        out.append(s.generated)
    return out


# ---- chunked prefill gives one prefill's logits and tokens ------------------------------------------------
def test_chunked_prefill_logits_match_one_prefill(eng, texts):
    core, p, q = eng.core, texts[1], texts[3]
    whole = seqs_for(eng, [p, q], 4)
    for s in whole:
        core.start(s)
    ref = core.step(whole[:1])[0]
    ref_q = core.step(whole[1:])[0]
    for chunks in ([7, 13, len(p) - 20], [1] * 5 + [len(p) - 5], [len(p) - 1, 1]):
        s, t = seqs_for(eng, [p, q], 4)
        core.start(s)
        core.start(t)
        for i, n in enumerate(chunks):
            if i == 1:                          # another prompt's chunk in the same forward, padded beside it
                logits = core.step([s, t], feed=[n, len(q)])
                assert torch.allclose(logits[1], ref_q, atol=1e-5, rtol=0)
            else:
                logits = core.step([s], feed=[n])
        assert s.kv.length == len(p)
        assert torch.allclose(logits[0], ref, atol=1e-5, rtol=0), (logits[0] - ref).abs().max()
    bad = seqs_for(eng, [p], 1)[0]
    core.start(bad)
    with pytest.raises(ValueError, match=r"feed=\[0\] must give each"):
        core.step([bad], feed=[0])


@pytest.mark.parametrize("scheduler,max_batch,budget", [("fifo", 1, 9), ("fifo", 3, 40), ("expert", 3, 5),
                                                        ("expert", 8, 512)])
def test_tokens_identical_lone_batched_chunked_any_schedule(eng, texts, alone, scheduler, max_batch, budget):
    """float32: every prompt's greedy tokens equal its lone run's, whatever the step size, chunking or schedule."""
    chunked = []
    b = Batcher(eng.core, eng.experts, 4, max_batch, scheduler, max_num_batched_tokens=budget)
    got = drive(b, seqs_for(eng, texts, 10),
                on_plan=lambda plan: chunked.extend(n for s, n in plan.chunks if n < len(s.tokens) - s.kv.length))
    assert got == alone
    assert chunked or budget == 512                     # small budgets did split prompts


# ---- the budget, and decodes never starved ---------------------------------------------------------------
def test_every_step_within_budget_and_decodes_never_starved(eng, texts):
    budget, steps = 12, []

    def check(plan):
        ready = [s for s in b.running.values() if not s.done and len(s.tokens) - s.kv.length == 1]
        steps.append((len(plan.decode) + plan.prefill_tokens, bool(ready), bool(plan.decode), bool(plan.chunks)))
    b = Batcher(eng.core, eng.experts, 4, 3, "fifo", max_num_batched_tokens=budget)
    drive(b, seqs_for(eng, texts, 6), on_plan=check)
    assert all(n <= budget for n, *_ in steps)
    assert all(decoded for _, ready, decoded, _ in steps if ready)          # a ready row always decodes
    assert sum(1 for *_, prefilled in steps if prefilled) > len(texts)      # prompts took several chunks
    assert any(decoded and prefilled for _, _, decoded, prefilled in steps)  # and decodes went on meanwhile


def test_budget_must_leave_room_for_prompts(eng):
    with pytest.raises(ValueError, match="max_num_batched_tokens=4 must be more than max_batch=4"):
        Batcher(eng.core, eng.experts, 8, 4, max_num_batched_tokens=4)


# ---- the prefill time share --------------------------------------------------------------------------------
class TimedCore:
    """The core with a model clock: a forward costs 4 ms + 1 ms per id fed (a CPU's shape of costs)."""

    def __init__(self, core):
        self.core, self.now = core, 0.0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def step(self, seqs, all_logits=False, feed=None):
        fed = sum(feed) if feed is not None else sum(len(s.tokens) - s.kv.length for s in seqs)
        self.now += 0.004 + 0.001 * fed
        return self.core.step(seqs, all_logits, feed)


def decoder_rate(eng, texts, neighbour: str, share=0.5):
    """Tokens per model second of one decoding sequence: alone, beside a "benign" one (another client decoding), or
    beside a "flood" (another client's 300-id prompts)."""
    timed = TimedCore(eng.core)
    b = Batcher(timed, eng.experts, 10, prefill_share=share, clock=lambda: timed.now, max_num_batched_tokens=128)
    ordinary = eng.core.sequence(texts[2], 120, GREEDY)              # no eos: 120 tokens
    others = {"alone": [], "benign": [eng.core.sequence(texts[5], 200, GREEDY)],
              "flood": seqs_for(eng, [(texts[1] * 5)[:300]] * 8, 2)}[neighbour]
    seen = []                                                        # (model time, ordinary's tokens) per step
    drive(b, [ordinary] + others, ["a"] + ["b"] * len(others),
          lambda plan: seen.append((timed.now, len(ordinary.generated))))
    seen.append((timed.now, len(ordinary.generated)))
    t0 = next(t for t, n in seen if n >= 1)
    t1 = next(t for t, n in seen if n == 120)
    return 119 / (t1 - t0)


def test_prefill_flood_keeps_a_decoder_within_2x_of_a_benign_neighbour(eng, texts):
    """The issue's goal in a model of the CPU's costs: within 2x of the benign-neighbour figure with the gate,
    well outside it without."""
    benign = decoder_rate(eng, texts, "benign")
    assert benign >= 0.75 * decoder_rate(eng, texts, "alone")
    assert decoder_rate(eng, texts, "flood") >= 0.5 * benign
    assert decoder_rate(eng, texts, "flood", share=None) < 0.3 * benign


def test_phase_gate_rules():
    from scheduling import PhaseGate
    g = PhaseGate(0.5)
    g.prefilled(0.3, decoding=True)
    assert not g.allows(decoding=True) and g.allows(decoding=False)
    g.decoded(0.2)
    assert not g.allows(True)
    g.decoded(0.1)
    assert g.allows(True)
    g.decoded(5.0)                                   # no credit banked
    g.prefilled(0.1, decoding=True)
    assert not g.allows(True)
    g.prefilled(0.1, decoding=False)                 # nobody was held back: the debt is forgiven
    assert g.allows(True)
    assert PhaseGate(None).allows(True)
    with pytest.raises(ValueError, match="share must be in"):
        PhaseGate(0)


# ---- per-client caps -----------------------------------------------------------------------------------
def test_a_client_over_its_cap_yields_seats_and_rows(eng, texts, alone):
    """"big" fills every seat while alone; "small" arrives: it is admitted at once (a big sequence is preempted
    and later recomputed), big runs at most `cap` rows per step beside it, and every text is its lone run's."""
    b = Batcher(eng.core, eng.experts, 4, scheduler="fifo", max_seqs_per_client=1)
    big = seqs_for(eng, texts[:6], 10)
    for s in big:
        b.enqueue(s, "big")
    for _ in range(3):
        plan = b.plan()
        for step, arg in ((b.prefill, plan.chunks), (b.decode, plan.decode)):
            if arg:
                step(arg)
    assert len(b.running) == 4 and {b.clients[i] for i in b.running} == {"big"}   # work-conserving: all seats
    small = seqs_for(eng, [texts[6]], 10)[0]
    rows = []

    def on_plan(plan):
        ids = {s.seq_id for s in plan.decode}
        if small.seq_id in ids:
            rows.append(sum(b.clients[i] == "big" for i in ids))
    b.enqueue(small, "small")
    plan = b.plan()
    assert small in plan.admitted and b.preemptions == 1
    for step, arg in ((b.prefill, plan.chunks), (b.decode, plan.decode)):
        if arg:
            step(arg)
    drive(b, [], on_plan=on_plan)
    assert rows and max(rows) <= 1
    assert [s.generated for s in big] == alone[:6] and small.generated == alone[6]


def test_one_client_alone_is_never_capped(eng, texts):
    b = Batcher(eng.core, eng.experts, 6, scheduler="fifo", max_seqs_per_client=1)
    widths = []
    drive(b, seqs_for(eng, texts, 5), ["one"] * len(texts), on_plan=lambda p: widths.append(len(p.decode)))
    assert max(widths) == 6 and b.preemptions == 0


def test_n64_neighbour_does_not_hold_back_an_ordinary_request(eng, texts):
    """Through the loop: one request's 24 sequences (client "a") and then an ordinary one (client "b"): b ends
    while most of a's sequences are still to run, and gets its lone-run text."""
    loop = EngineLoop(eng, max_num_seqs=4, scheduler="fifo", max_seqs_per_client=2).start()
    order, done = [], threading.Event()
    lock = threading.Lock()

    def on_event(name):
        def f(ev):
            if ev.finish_reason is not None:
                with lock:
                    order.append(name)
                    if len(order) == 25:
                        done.set()
        return f
    try:
        for i in range(24):
            loop.submit(Request(texts[1], 24, GREEDY, on_event("a"), client="a"))
        loop.submit(Request(texts[2], 10, GREEDY, on_event("b"), client="b"))
        assert done.wait(300)
    finally:
        loop.shutdown()
    assert order.index("b") < 8, order


# ---- the cold-expert cap ------------------------------------------------------------------------------------
def test_a_routing_diverse_row_waits_while_others_run():
    eng = moe_engine.load(dtype="float32", gpu_mem="22M", max_kv_tokens=512, progress=False)
    try:
        b = Batcher(eng.core, eng.experts, 4, scheduler="fifo", max_cold_experts=3, max_wait_steps=2)
        seqs = seqs_for(eng, [[5], [6], [7]], 4)
        for s in seqs:
            b.enqueue(s)
        b.admit()
        layers = eng.spec.moe_layers
        resident = [eng.experts.residents(m) for m in layers]
        cold = [frozenset(sorted(set(range(eng.spec.moe.num_experts)) - r)[:2]) for r in resident]
        warm = [frozenset(sorted(r)[:1]) for r in resident]
        diverse = seqs[2].seq_id
        b.recorder.forecast = lambda sid, tok: cold if sid == diverse else warm
        picks = [{s.seq_id for s in b.pick(b.decoding())} for _ in range(4)]
        assert [diverse in p for p in picks] == [False, False, True, False]   # left out up to max_wait_steps
        assert all(len(p) >= 2 for p in picks)
        alone = [s for s in seqs if s.seq_id == diverse]
        assert b.pick(alone) == alone                                        # nobody else ready: it runs
    finally:
        eng.close()


# ---- all resident: "expert" is "fifo" -----------------------------------------------------------------------
def test_expert_schedules_as_fifo_when_every_expert_is_resident(eng, texts):
    runs = {}
    for name in ("fifo", "expert"):
        seqs = seqs_for(eng, texts, [3, 9, 5, 7, 4, 8, 6, 2])
        idx = {s.seq_id: i for i, s in enumerate(seqs)}
        b = Batcher(eng.core, eng.experts, 6, 2, name, max_num_batched_tokens=32)
        assert b.observer is None and b.prefill_wait == 0          # no forecasts kept, admission never held
        log = runs[name] = []
        drive(b, seqs, on_plan=lambda p: log.append(([idx[s.seq_id] for s in p.decode],
                                                     [(idx[s.seq_id], n) for s, n in p.chunks])))
    assert runs["fifo"] == runs["expert"]
    assert any(len(d) == 2 for d, _ in runs["fifo"])              # more were ready than a step takes


# ---- the server: who is a client -----------------------------------------------------------------------------
def _http(headers: dict, peer=("10.0.0.1", 5000)):
    from starlette.requests import Request as HTTPRequest
    scope = {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": peer, "method": "POST", "path": "/v1/completions"}
    return HTTPRequest(scope)


def test_server_client_identity():
    from moe_engine.server.app import ServerState, client_id
    from moe_engine.server.app import ServerConfig
    open_ = ServerState(ServerConfig())
    a, a2 = client_id(_http({"Authorization": "Bearer k1"}), open_), client_id(_http({"Authorization": "Bearer k1"},
                                                                                   ("10.0.0.2", 1)), open_)
    assert a == a2 and "k1" not in a                                        # the key, not where it came from
    assert client_id(_http({"Authorization": "Bearer k2"}), open_) != a
    assert client_id(_http({}), open_) == "peer:10.0.0.1:5000"
    keyed = ServerState(ServerConfig(api_key="k1"))                         # one key for everyone: connections
    assert client_id(_http({"Authorization": "Bearer k1"}), keyed) == "peer:10.0.0.1:5000"


@pytest.mark.parametrize("kw,words", [({"max_num_batched_tokens": 16}, "--max-num-batched-tokens"),
                                      ({"max_seqs_per_client": 0}, "--max-seqs-per-client"),
                                      ({"max_cold_experts": -1}, "--max-cold-experts"),
                                      ({"max_num_batched_tokens": 6, "max_batch": 8}, "more than 8")])
def test_server_config_errors(kw, words):
    from moe_engine.server.app import ServerConfig
    with pytest.raises(ConfigError, match=words):
        ServerConfig(**kw)
