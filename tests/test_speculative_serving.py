"""Speculative decoding beyond generate()'s lockstep: load()'s speculative_config as the default of generate() and
stream(), the CLI's --speculative-config, per-sequence drafts in the continuous batch (Batcher, generate(max_batch=)
and the server's EngineLoop), its token budget and preemption, and the stats / metrics that report the drafts.
float32, bundled model: greedy tokens with drafts are exactly those without."""
from __future__ import annotations

import contextlib
import json
import threading

import httpx
import pytest
import torch
from test_server import KEY, MODEL, LiveServer, openai_client, scrape, sse_events

import moe_engine
from moe_engine.cli import main
from moe_engine.errors import ConfigError
from moe_engine.runtime.batching import Batcher
from moe_engine.runtime.drafting import Drafter
from moe_engine.runtime.sampling import SamplingParams
from moe_engine.runtime.speculative import SpeculativeConfig
from moe_engine.server import create_app

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
CODE = ["def add(a, b):\n    return a + b\n\ndef add(", "import os\nimport sys\nimport",
        "x = [1, 2, 3]\nx = [1, 2,", "for i in range(10):\n    print(i)\nfor i in range(", "# a"]


@pytest.fixture(scope="module")
def eng():
    """A quarter of the experts' budget: resident drafts route among the cached ones, ngram drafts are cut by cost."""
    torch.set_num_threads(1)
    e = moe_engine.load(None, dtype="float32", progress=False, gpu_mem="25M")
    yield e
    e.close()


def drive(b: Batcher, seqs, clients=None, steps=None, plans=None):
    """Every sequence to its end (or `steps` steps) through `b`, drafts included; every step within the token budget;
    plans: a list that gets each step's plan."""
    for i, s in enumerate(seqs):
        b.enqueue(s, clients[i] if clients else None)
    obs = b.core.observing(b.observer) if b.observer is not None else contextlib.nullcontext()
    with obs:
        for _ in range(steps if steps is not None else 10**6):
            if not (b.waiting or b.running):
                break
            plan = b.plan()
            if plans is not None:
                plans.append(plan)
            assert len(plan.decode) + sum(plan.draft_room) + plan.prefill_tokens <= b.budget
            assert len(plan.draft_room) == len(plan.decode)
            for seq, _ in (b.prefill(plan.chunks) if plan.chunks else []):
                if seq.done:
                    b.release(seq)
            for seq, _ in (b.decode(plan.decode) if plan.decode else []):
                if seq.done:
                    b.release(seq)


# ---- generate(max_batch=N): the Batcher with drafts ------------------------------------------------------
@pytest.mark.parametrize("method", ["ngram", "resident"])
def test_batched_drafts_give_greedy_tokens(eng, method):
    """Five prompts of different lengths, two rows per step, a stop string met mid-way by one of them: the texts
    with drafts are lockstep greedy's without, and the stats report what the drafts earned."""
    free = eng.generate(CODE, max_new_tokens=20, speculative_config=False)
    stop = free[1][6:9]                                       # met mid-generation (possibly mid-draft)
    want = eng.generate(CODE, max_new_tokens=20, stop=[stop], speculative_config=False)
    assert want[1] != free[1]
    spec = {"method": method, "num_speculative_tokens": 3}
    assert eng.generate(CODE, max_new_tokens=20, stop=[stop], max_batch=2, speculative_config=spec) == want
    st = eng.stats()["speculation"]
    assert st["method"] == method and st["drafted"] > 0 and 0 <= st["accepted"] <= st["drafted"]
    assert st["decode_tokens"] >= st["decode_rows"] > 0
    assert st["tokens_per_step"] == st["decode_tokens"] / st["decode_rows"] >= 1
    assert st["loads_per_token"] is not None and st["loads_per_token"] >= 0


def test_preempted_sequences_with_drafts_recompute_the_same_tokens(eng):
    """A client over its seat cap is preempted while drafting (its drafter state forgotten), recomputed later: every
    sequence's tokens are its lone greedy run's; a tight token budget caps the drafts (drive checks it)."""
    prompts = [eng.encode(p) for p in CODE]
    alone = [eng.generate(torch.tensor([p]), max_new_tokens=12, speculative_config=False)[0, len(p):].tolist()
             for p in prompts]
    drafter = Drafter(eng.core, eng.experts, SpeculativeConfig("ngram", num_speculative_tokens=4))
    b = Batcher(eng.core, eng.experts, 3, max_batch=3, scheduler="fifo", max_seqs_per_client=1,
                max_num_batched_tokens=8, drafter=drafter)
    seqs = [eng.core.sequence(p, 12, SamplingParams(), eng.eos_ids(None)) for p in prompts]
    drive(b, seqs[:4], ["big"] * 4, steps=12)
    assert len(b.running) == 3
    drive(b, seqs[4:], ["small"])
    assert b.preemptions >= 1 and b.spec_draft_tokens > 0
    assert [s.generated for s in seqs] == alone
    assert not drafter.accept                                  # every sequence that ended or left was forgotten


def test_rows_with_processors_or_logprobs_are_not_drafted(eng):
    drafter = Drafter(eng.core, eng.experts, SpeculativeConfig("ngram"))
    b = Batcher(eng.core, eng.experts, 2, drafter=drafter)
    ids = eng.encode(CODE[0])
    plain = eng.core.sequence(ids, 8, SamplingParams())
    penalized = eng.core.sequence(ids, 8, SamplingParams(presence_penalty=0.5))
    scored = eng.core.sequence(ids, 8, SamplingParams(logprobs=2))
    rooms = []
    drive(b, [plain, penalized, scored], plans=rooms)
    assert all(len(s.generated) == 8 for s in (plain, penalized, scored)) and len(scored.logprobs) == 8
    by_seq = [dict(zip((s.seq_id for s in p.decode), p.draft_room)) for p in rooms]
    assert any(r.get(plain.seq_id) for r in by_seq)
    assert not any(r.get(penalized.seq_id) or r.get(scored.seq_id) for r in by_seq)


# ---- load()'s default, stream(), the CLI ------------------------------------------------------------------
def test_load_default_applies_to_generate_and_stream_and_can_be_turned_off():
    e = moe_engine.load(None, dtype="float32", progress=False, speculative_config=json.dumps(NGRAM))
    try:
        assert e.speculative_config == SpeculativeConfig("ngram", num_speculative_tokens=3)
        want = e.generate(CODE[:2], max_new_tokens=16, speculative_config=False)
        assert e.speculation is None                           # False: no drafts, no speculation section
        assert e.generate(CODE[:2], max_new_tokens=16) == want
        assert e.stats()["speculation"]["drafted"] > 0
        e.speculation = None
        assert "".join(e.stream(CODE[0], max_new_tokens=16)) == want[0]
        assert e.speculation["drafted"] > 0 and e.speculation["tokens_per_step"] >= 1
        e.speculation = None
        assert "".join(e.stream(CODE[0], max_new_tokens=16, speculative_config=False)) == want[0]
        assert e.speculation is None
    finally:
        e.close()


@pytest.mark.parametrize("value, words", [("{", "speculative_config is not valid JSON"),
                                          ({"method": "medusa"}, "medusa"), ([1], "must be a JSON object"),
                                          ({"method": "ngram", "k": 2}, "unknown key 'k'")])
def test_load_refuses_a_bad_speculative_config_before_reading_the_model(value, words):
    with pytest.raises(ConfigError, match=words):
        moe_engine.load("/nonexistent-model-dir", speculative_config=value)


def test_cli_flag(capsys):
    assert main(["generate", "--prompt", "x", "--speculative-config", "{"]) == 2
    assert "--speculative-config is not valid JSON" in capsys.readouterr().err
    assert main(["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}']) == 2
    assert "num_speculative_tokens=0" in capsys.readouterr().err
    args = ["generate", "--prompt", CODE[0], "--max-new-tokens", "12", "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative-config", json.dumps(NGRAM)]) == 0
    assert capsys.readouterr().out == plain


# ---- the server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_engine():
    e = moe_engine.load(None, dtype="float32", progress=False, speculative_config=NGRAM)
    e.reference = {p: e.generate(p, max_new_tokens=16, speculative_config=False) for p in CODE}
    e.penalized = e.generate(CODE[0], max_new_tokens=16, presence_penalty=0.8, speculative_config=False)
    yield e
    e.close()


@pytest.fixture(scope="module")
def spec_live(spec_engine):
    app = create_app(spec_engine, api_key=KEY, max_num_seqs=6, max_batch=3, metrics_prefix="vllm")
    srv = LiveServer(app)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def spec_client(spec_live):
    return openai_client(spec_live.url)


def test_server_greedy_text_with_drafts_is_the_text_without(spec_client, spec_live, spec_engine):
    before = scrape(spec_live.url)
    out = {}

    def ask(p):
        out[p] = spec_client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
    threads = [threading.Thread(target=ask, args=(p,)) for p in CODE]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in CODE:
        assert out[p].choices[0].text == spec_engine.reference[p]
        assert out[p].usage.completion_tokens == 16
    after = scrape(spec_live.url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["vllm:spec_decode_num_drafts_total"] > 0
    assert 0 <= delta["vllm:spec_decode_num_accepted_tokens_total"] <= delta["vllm:spec_decode_num_draft_tokens_total"]
    assert delta["vllm:spec_decode_num_draft_tokens_total"] >= delta["vllm:spec_decode_num_drafts_total"]
    assert delta["vllm:generation_tokens_total"] == 16 * len(CODE)


def test_server_streams_the_same_text_and_stops_mid_draft(spec_client, spec_live, spec_engine):
    prompt = CODE[0]
    chunks = list(spec_client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].text for c in chunks) == spec_engine.reference[prompt]
    stop = spec_engine.reference[prompt][5:8]
    with httpx.stream("POST", spec_live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True, "stop": [stop]}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == spec_engine.reference[prompt].split(stop)[0]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_server_logprobs_penalties_and_sampling_still_work(spec_client, spec_engine):
    r = spec_client.completions.create(model=MODEL, prompt=CODE[0], max_tokens=16, temperature=0, logprobs=2)
    assert r.choices[0].text == spec_engine.reference[CODE[0]] and len(r.choices[0].logprobs.tokens) == 16
    r = spec_client.completions.create(model=MODEL, prompt=CODE[0], max_tokens=16, temperature=0,
                                       presence_penalty=0.8)
    assert r.choices[0].text == spec_engine.penalized
    for seed in (1, 2):
        r = spec_client.completions.create(model=MODEL, prompt=CODE[3], max_tokens=9, temperature=1.0, seed=seed)
        assert r.usage.completion_tokens <= 9 and r.choices[0].finish_reason in ("length", "stop")


# ---- moe-engine profile --speculative-config ---------------------------------------------------------------
def test_profile_compares_runs_without_and_with_drafts(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from moe_engine.profiling.profile import load_schema
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CODE[:3]) + "\n", encoding="utf-8")
    out = tmp_path / "p.json"
    assert main(["profile", "--gpu-mem", "25M", "--dtype", "float32", "--no-progress", "--prompts", str(prompts),
                 "--max-new-tokens", "16", "--json", str(out), "--speculative-config", json.dumps(NGRAM)]) == 0
    report = capsys.readouterr().out
    profile = json.loads(out.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(load_schema()).validate(profile)
    spec = profile["profile"]["speculation"]
    off, on = spec["without"], spec["with"]
    assert spec["config"]["method"] == "ngram" and spec["config"]["num_speculative_tokens"] == 3
    assert off["generated_tokens"] == on["generated_tokens"] == sum(profile["profile"]["requests"]["new_tokens"])
    assert off["tokens_per_step"] == 1.0 and on["tokens_per_step"] >= 1.0
    assert on["decode_steps"] <= off["decode_steps"] and on["drafted"] >= on["accepted"] >= 0
    assert on["acceptance"] == (on["accepted"] / on["drafted"] if on["drafted"] else None)
    for run in (off, on):
        assert run["loads_per_token"] == run["expert_loads"] / run["generated_tokens"]
    assert "speculative decoding (ngram" in report and "loads per generated token" in report
    broken = json.loads(json.dumps(profile))
    del broken["profile"]["speculation"]["with"]["acceptance"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema(), cls=jsonschema.Draft202012Validator)
