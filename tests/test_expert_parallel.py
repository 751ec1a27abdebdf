"""Expert parallelism (moe_engine/distributed/): outputs equal one process, offloading per rank, startup checks,
failures named within seconds, bad values refused in one line. CPU, gloo, 2 and 4 processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import moe_engine
from moe_engine.checkpoint import Checkpoint
from moe_engine.distributed import RankError
from moe_engine.distributed.group import free_port
from moe_engine.distributed.placement import ShardCheckpoint, balanced, contiguous, make_placement
from moe_engine.errors import ConfigError
from moe_engine.profiling.trace import Trace, save_trace

F32 = dict(device="cpu", dtype="float32", progress=False)
IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61], [1, 2, 3, 4, 5, 6, 7]])
PROMPTS = [[5, 17, 3, 99], [1, 2, 3], [42, 8, 61, 77, 12], [9, 9, 9]]


def _reference(path, **kw):
    eng = moe_engine.load(path, **F32, **kw)
    try:
        return eng.logits(IDS), eng.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6)
    finally:
        eng.close()


@pytest.mark.parametrize("case,world", [("mixtral", 2), ("qwen3_moe", 4), ("deepseek_v2-lite", 2), ("gpt_oss", 2)])
def test_outputs_equal_one_process(checkpoint_dir, case, world):
    path = checkpoint_dir(case)
    logits, tokens = _reference(path)
    eng = moe_engine.load(path, **F32, expert_parallel=world)
    try:
        torch.testing.assert_close(eng.logits(IDS), logits, atol=1e-5, rtol=0)
        assert torch.equal(eng.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6), tokens)
        ep = eng.stats()["expert_parallel"]
        assert ep["world_size"] == world and [r["rank"] for r in ep["ranks"]] == list(range(world))
        assert all(r["cache"]["hits"] > 0 for r in ep["ranks"])      # every rank computed some of the pairs
        assert ep["comm_layer_calls"] > 0 and ep["comm_seconds"] > 0
    finally:
        eng.close()


def _torchrun_env(monkeypatch, world: int, port: int) -> dict:
    """This process as rank 0 of a torchrun-style launch; the env for the other ranks."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    for k, v in {**env, "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    return env


def _rank(env: dict, rank: int, path, **kw) -> subprocess.Popen:
    """A rank started as torchrun would: its own process, its own load() keywords."""
    code = (f"import moe_engine; moe_engine.load({str(path)!r}, device='cpu', dtype='float32', progress=False, "
            f"**{kw!r})")
    full = {**os.environ, **env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
    return subprocess.Popen([sys.executable, "-c", code], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _budget(case_path, slots_over_min: int = 0) -> tuple[int, int]:
    """gpu_mem of rank 0 (non-expert weights, KV) and of a worker (neither) with the minimum slots (+ a few)."""
    from moe_engine.experts.plan import make_plan
    from moe_engine.runtime.build import non_expert_bytes
    ckpt = Checkpoint(case_path)
    view = ShardCheckpoint(ckpt, contiguous(ckpt.spec, 2), 0)
    out = []
    for non_expert, kv in ((non_expert_bytes(ckpt, torch.float32), None), (0, 1)):
        huge = make_plan(view.spec, torch.device("cpu"), torch.float32, non_expert, 1 << 40, None, kv, 2, 0)
        fixed = huge.non_expert_bytes + huge.kv_bytes + huge.io_bytes
        out.append(fixed + (len(view.spec.moe_layers) * view.spec.moe.top_k + slots_over_min) * huge.slot_bytes)
    ckpt.close()
    return out[0], out[1]


def test_offloading_on_every_rank_batched(checkpoint_dir, monkeypatch):
    """Budgets below each rank's share: both ranks miss and load; batched tokens equal one process's."""
    path = checkpoint_dir("qwen3_moe")
    ref = moe_engine.load(path, **F32)
    want = ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=5)
    ref_texts = ref.generate(torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in PROMPTS], batch_first=True),
                             attention_mask=_mask(PROMPTS), max_new_tokens=5)
    ref.close()
    g0, g1 = _budget(path, 1)
    env = _torchrun_env(monkeypatch, 2, free_port())
    worker = _rank(env, 1, path, expert_parallel=2, gpu_mem=g1)
    eng = moe_engine.load(path, **F32, expert_parallel=2, gpu_mem=g0)
    try:
        assert torch.equal(eng.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=5), want)
        batched = eng.generate(torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in PROMPTS], batch_first=True),
                               attention_mask=_mask(PROMPTS), max_new_tokens=5, max_batch=2)
        assert torch.equal(batched, ref_texts)
        ranks = eng.stats()["expert_parallel"]["ranks"]
        assert all(r["cache"]["misses"] > 0 and r["io"]["loads"] > 0 for r in ranks), ranks
        assert eng.stats()["io"]["loads"] == sum(r["io"]["loads"] for r in ranks)
    finally:
        eng.close()
    assert worker.wait(20) == 0


def _mask(prompts):
    return torch.nn.utils.rnn.pad_sequence([torch.ones(len(p), dtype=torch.long) for p in prompts], batch_first=True)


def test_killed_rank_is_named_within_seconds(checkpoint_dir):
    eng = moe_engine.load(checkpoint_dir("mixtral"), **F32, expert_parallel=2)
    proc = eng.experts.cluster.spawned.procs[1]
    seen = []
    t0 = None
    with pytest.raises(RankError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL") as err:
        for i, _ in enumerate(_steps(eng, 50)):
            seen.append(i)
            if i == 2:
                os.kill(proc.pid, signal.SIGKILL)
                t0 = time.monotonic()
    assert time.monotonic() - t0 < 10 and len(seen) == 3
    assert "\n" not in str(err.value)
    with pytest.raises(RankError, match="rank 1"):               # every later call says the same
        eng.logits(IDS)
    eng.close()


def _steps(eng, n):
    """Decode steps of one sequence through the engine's core (token ids; yields after each step)."""
    seq = eng.core.sequence(PROMPTS[0], n, None)
    eng.core.start(seq)
    for _ in range(n):
        logits = eng.core.step([seq])
        seq.tokens.append(int(logits[0].argmax()))
        yield seq


def test_mismatched_checkpoint_refused(checkpoint_dir, tmp_path, monkeypatch):
    path = checkpoint_dir("mixtral")
    other = tmp_path / "other"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_theta", 10000.0) * 2
    (other / "config.json").write_text(json.dumps(cfg))
    env = _torchrun_env(monkeypatch, 2, free_port())
    worker = _rank(env, 1, other, expert_parallel=2)
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 does not match rank 0: its checkpoint differs from rank 0's in "
                                        r"config\.json"):
        moe_engine.load(path, **F32, expert_parallel=2)
    assert time.monotonic() - t0 < 30
    assert worker.wait(20) != 0


def test_mismatched_settings_refused(checkpoint_dir, monkeypatch):
    path = checkpoint_dir("mixtral")
    env = _torchrun_env(monkeypatch, 2, free_port())
    code = (f"import moe_engine; moe_engine.load({str(path)!r}, device='cpu', dtype='bfloat16', progress=False, "
            f"expert_parallel=2)")
    worker = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env, "RANK": "1", "LOCAL_RANK": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with pytest.raises(RankError, match="rank 1 does not match rank 0: its dtype is .bfloat16. where rank 0 has "
                                        ".float32."):
        moe_engine.load(path, **F32, expert_parallel=2)
    assert worker.wait(20) != 0


@pytest.mark.parametrize("value,match", [
    (0, r"expert_parallel=0 is invalid: use an integer from 1 to 4096"),
    ("2", r"expert_parallel='2' is invalid"),
    (3, r"expert_parallel=3 must divide the model's 4 experts per layer so every rank owns as many; use one of \[1, 2, 4\]"),
    (8, r"expert_parallel=8 is more than the model's 4 experts per layer"),
])
def test_bad_expert_parallel(checkpoint_dir, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        moe_engine.load(checkpoint_dir("mixtral"), **F32, expert_parallel=value)
    assert "\n" not in str(err.value)


def test_world_size_and_option_mismatches(checkpoint_dir, monkeypatch, tmp_path):
    path = checkpoint_dir("mixtral")
    with pytest.raises(ConfigError, match=r"expert_placement places experts on the ranks"):
        moe_engine.load(path, **F32, expert_placement=tmp_path / "t.npz")
    with pytest.raises(ConfigError, match=r"expert_placement=.*is not a file"):
        moe_engine.load(path, **F32, expert_parallel=2, expert_placement=tmp_path / "t.npz")
    with pytest.raises(ConfigError, match=r"quant=int8 does not work with expert_parallel=2"):
        moe_engine.load(path, **F32, expert_parallel=2, quant="int8")
    _torchrun_env(monkeypatch, 4, free_port())
    with pytest.raises(ConfigError, match=r"expert_parallel=2 does not match WORLD_SIZE=4"):
        moe_engine.load(path, **F32, expert_parallel=2)


def test_balanced_placement_spreads_hot_experts(checkpoint_dir, tmp_path):
    path = checkpoint_dir("qwen3_moe")
    spec = Checkpoint(path).spec
    load = np.array([[100, 90, 1, 1, 1, 1, 80, 70]] * len(spec.moe_layers))
    p = balanced(spec, 2, load, "test")
    for layer in spec.moe_layers:
        r0, r1 = p.experts_of(0, layer), p.experts_of(1, layer)
        assert sorted(r0 + r1) == list(range(8)) and len(r0) == len(r1) == 4
        assert (0 in r0) != (1 in r0) and (6 in r0) != (7 in r0)     # the hot ones on different ranks
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, size=(50, len(spec.moe_layers), 2)).astype(np.int16)
    experts[:, :, 0] = 0                                                # expert 0 hot everywhere
    trace = Trace(experts, np.full(experts.shape, 0.5, np.float32), np.array([0, 50]), num_experts=8)
    save_trace(tmp_path / "t.npz", trace)
    placed = make_placement(spec, 2, tmp_path / "t.npz")
    assert placed.source.startswith("balanced") and placed.key() != contiguous(spec, 2).key()
    logits, _ = _reference(path)
    eng = moe_engine.load(path, **F32, expert_parallel=2, expert_placement=tmp_path / "t.npz")
    try:
        torch.testing.assert_close(eng.logits(IDS), logits, atol=1e-5, rtol=0)
    finally:
        eng.close()


def test_shard_reads_only_its_experts(checkpoint_dir):
    ckpt = Checkpoint(checkpoint_dir("qwen3_moe"))
    placement = contiguous(ckpt.spec, 4)
    layer = ckpt.spec.moe_layers[0]
    view = ShardCheckpoint(ckpt, placement, 3)
    assert view.spec.moe.num_experts == 2
    assert torch.equal(view.read_expert(layer, 1, torch.float32), ckpt.read_expert(layer, 7, torch.float32))
    ckpt.close()


def test_server_concurrent_requests_then_lost_rank():
    """Concurrent completions through the ranks give one process's texts; after a rank dies: 503 naming it."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from moe_engine.server import create_app
    prompts = ["The cat", "Once upon a time", "1, 2, 3,", "Hello"]
    ref = moe_engine.load(None, **F32)
    want = [ref.generate(p, max_new_tokens=6) for p in prompts]
    ref.close()
    eng = moe_engine.load(None, **F32, expert_parallel=2)
    app = create_app(eng, max_num_seqs=4, max_batch=4)
    with TestClient(app) as c:
        def complete(p):
            r = c.post("/v1/completions", json={"model": "tiny-moe", "prompt": p, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        stop = threading.Event()

        def poll():      # stats gathers from another thread (as /metrics does) never interleave with a step
            while not stop.wait(0.1):
                eng.stats()
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                assert list(pool.map(complete, prompts)) == want
        finally:
            stop.set()
            poller.join()
        metrics = c.get("/metrics").text
        for r in ("0", "1"):
            assert f'moe_engine:rank_expert_cache_hits_total{{rank="{r}"}}' in metrics
        assert "moe_engine:expert_parallel_comm_seconds_total" in metrics
        assert "moe_engine:expert_parallel_ranks 2.0" in metrics
        os.kill(eng.experts.cluster.spawned.procs[1].pid, signal.SIGKILL)
        r = c.post("/v1/completions", json={"model": "tiny-moe", "prompt": "x", "max_tokens": 4})
        deadline = time.monotonic() + 10
        while r.status_code != 503 and time.monotonic() < deadline:    # the request in flight ends with an error
            time.sleep(0.2)
            r = c.post("/v1/completions", json={"model": "tiny-moe", "prompt": "x", "max_tokens": 4})
        assert r.status_code == 503 and "rank 1" in r.text, r.text
    eng.close()


def test_speculative_ngram_across_ranks_and_resident_refused():
    """Verify steps through the ranks keep greedy tokens; their forecast prefetches reach every rank's cache."""
    prompt = "1, 2, 3, 4, 1, 2, 3, 4, 1, 2"
    ref = moe_engine.load(None, **F32)
    want = ref.generate(prompt, max_new_tokens=8)
    ref.close()
    eng = moe_engine.load(None, **F32, expert_parallel=2, gpu_mem="23M")
    try:
        spec = {"method": "ngram", "num_speculative_tokens": 3}
        assert eng.generate(prompt, max_new_tokens=8, speculative_config=spec) == want
        assert eng.stats()["speculation"]["verify_steps"] > 0
        with pytest.raises(ConfigError, match="speculative method 'resident'.*does not work with expert_parallel"):
            eng.generate(prompt, max_new_tokens=4, speculative_config={"method": "resident"})
    finally:
        eng.close()


@pytest.mark.parametrize("value,match", [("0", "--expert-parallel 0 is invalid"),
                                         ("3", "--expert-parallel 3 must divide the model's 4 experts")])
def test_cli_flag_errors_are_one_line(checkpoint_dir, capsys, value, match):
    from moe_engine.cli import main
    rc = main(["generate", str(checkpoint_dir("mixtral")), "--prompt", "x", "--device", "cpu",
               "--expert-parallel", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and "\n" not in err, err


def test_rank_that_cannot_start_is_named(checkpoint_dir, monkeypatch):
    """A worker whose budget cannot hold its share stops the start with its own error, naming the rank; rank 0's
    own share (built meanwhile) is closed."""
    from moe_engine.distributed import launch
    path = checkpoint_dir("mixtral")
    env = _torchrun_env(monkeypatch, 2, free_port())
    closed = []

    class Shard(launch.Shard):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            close = self.cache.close
            self.cache.close = lambda: (closed.append(self.rank), close())
    monkeypatch.setattr(launch, "Shard", Shard)
    worker = _rank(env, 1, path, expert_parallel=2, gpu_mem="1M")
    with pytest.raises(RankError, match=r"rank 1 failed to build its share: ConfigError: gpu_mem=1.00 MiB is too "
                                        r"small") as err:
        moe_engine.load(path, **F32, expert_parallel=2)
    assert "\n" not in str(err.value)
    assert worker.wait(20) != 0
    assert closed == [0]


def test_failed_start_calls_off_waiting_ranks(checkpoint_dir, monkeypatch, tmp_path):
    """Rank 1 fails after joining: rank 0 names it, and ranks 2 and 3 (waiting for rank 0's verdict) stop at once
    rather than wait for a store that outlives the attempt (here: rank 0's process goes on)."""
    path = checkpoint_dir("mixtral")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    env = _torchrun_env(monkeypatch, 4, free_port())
    ranks = [_rank(env, 1, broken, expert_parallel=4)] + [_rank(env, r, path, expert_parallel=4) for r in (2, 3)]
    with pytest.raises(RankError, match=r"could not start: rank 1 failed: ") as err:
        moe_engine.load(path, **F32, expert_parallel=4)
    assert "\n" not in str(err.value)
    assert [p.wait(20) != 0 for p in ranks] == [True] * 3


class _Shard:
    def __init__(self, error=None):
        self.error, self.layers = error, []

    def compute(self, layer, x, weights, ids, forecast):
        self.layers.append(layer)
        if self.error is not None:
            raise self.error
        return torch.zeros(x.shape)


def _fake_rank0(monkeypatch, all_reduce):
    """torch.distributed's collectives as a worker sees them: one LAYER command (layer 3), then STOP."""
    from moe_engine.distributed import comm
    x, w, ids = torch.randn(2, 8), torch.rand(2, 2), torch.tensor([[0, 1], [1, 0]])
    sent = iter([torch.tensor([comm.LAYER, 3, 2, 2, 0, 0, -1, 0]), comm.pack(x, w, ids, {}),
                 torch.tensor([comm.STOP] + [0] * (comm.HEADER - 1))])

    def broadcast(t, src, group=None):
        t.copy_(next(sent))
    monkeypatch.setattr(comm.dist, "broadcast", broadcast)
    monkeypatch.setattr(comm.dist, "all_reduce", all_reduce)
    return lambda shard: comm.serve_commands(shard, None, None, torch.device("cpu"), 8, 4, dict)


def test_worker_tells_its_own_error_from_a_lost_peer(monkeypatch):
    """A failure of the worker's own work reaches run_worker as raised (posted for rank 0 under its rank); a failed
    collective is PeerLost (rank 0, or another rank, is gone: nothing of this rank's to report)."""
    from moe_engine.distributed.comm import PeerLost
    serve = _fake_rank0(monkeypatch, lambda t, group=None: None)
    with pytest.raises(RuntimeError, match="boom"):
        serve(_Shard(RuntimeError("boom")))

    def lost(t, group=None):
        raise RuntimeError("Connection closed by peer")
    serve, shard = _fake_rank0(monkeypatch, lost), _Shard()
    with pytest.raises(PeerLost, match="Connection closed by peer"):
        serve(shard)
    assert shard.layers == [3]


def test_no_command_after_close(monkeypatch):
    """close() stops the workers; the idle ping (or any call) that takes the lock after it sends nothing and does
    not report a lost rank (which would make the server exit as failed while it shuts down)."""
    from moe_engine.distributed.launch import Cluster

    class Link:
        lock, last_command = threading.Lock(), time.monotonic()

        def __init__(self):
            self.sent = []

        def ping(self):
            self.sent.append("ping")

        def stop(self):
            self.sent.append("stop")
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    link, failures = Link(), []
    cluster = Cluster(link, None, None)
    cluster.listeners.append(failures.append)
    cluster.close()
    with pytest.raises(RankError, match="closed"):
        cluster.call(link.ping)
    assert link.sent == ["stop"] and failures == [] and cluster.failure is None


def test_an_idle_rank_still_takes_the_layers_forecast_and_counts_the_pass(checkpoint_dir):
    """A rank that owns none of a layer's routed experts still runs the layer's cache pass: the forecast rank 0
    sent starts its prefetches and the cache's step count follows the model's, as in one process."""
    from moe_engine.distributed.ranks import rank_plan
    from moe_engine.distributed.shard import Shard
    from moe_engine.runtime.config import EngineConfig
    path = checkpoint_dir("qwen3_moe")
    ckpt = Checkpoint(path)
    placement = contiguous(ckpt.spec, 2)
    view = ShardCheckpoint(ckpt, placement, 1)
    g0, g1 = _budget(path, 1)
    config = EngineConfig.from_kwargs(path, device="cpu", dtype="float32", gpu_mem=g1, predictor=None)
    plan = rank_plan(config, view, torch.device("cpu"), torch.float32, 0, 0)
    shard = Shard(view, placement, plan, torch.float32, torch.device("cpu"), config.offload, config.kernels, False)
    try:
        assert shard.cache.evicts
        e, k, d = ckpt.spec.moe.num_experts, ckpt.spec.moe.top_k, ckpt.spec.hidden_size
        first, second = ckpt.spec.moe_layers[:2]
        theirs = torch.arange(k)[None]                                 # experts of rank 0 only
        ctl = shard.cache.controller
        steps = ctl.step
        scores = torch.zeros(1, e)
        scores[0, placement.experts_of(1, second)[:k]] = 1.0           # rank 1's experts forecast for the next layer
        for _ in range(2):                                             # two steps through the same layer
            out = shard.compute(first, torch.randn(1, d), torch.ones(1, k), theirs, {second: scores})
            assert torch.count_nonzero(out) == 0
        assert ctl.step == steps + 1 and shard.cache.counters.prefetch_issued > 0
    finally:
        shard.cache.close()
        ckpt.close()
