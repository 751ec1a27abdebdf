"""The redesign's seams: observers stack and outlive the serving loop, experts are bound once, configuration is
checked once (unknown keywords, units) and kernel switches are read at build, never while generating."""
from __future__ import annotations

import threading

import pytest

import moe_engine
from moe_engine import _ops
from moe_engine.config import parse_rate, parse_size
from moe_engine.errors import ConfigError
from moe_engine.model.linear import Linear
from moe_engine.profiling.record import RoutingRecorder
from moe_engine.runtime.loop import EngineLoop, Request
from moe_engine.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def eng():
    e = moe_engine.load(dtype="float32", progress=False)
    yield e
    e.close()


def test_observers_stack_and_outlive_the_serving_loop(eng):
    a, b = RoutingRecorder(eng.spec.moe_layers), RoutingRecorder(eng.spec.moe_layers)
    with eng.observing(a), eng.observing(b):
        eng.generate("def f(x):", max_new_tokens=3)
        assert len(a.steps) == len(b.steps) == 3                     # prefill + 2 decode steps, seen by both
        loop = EngineLoop(eng, max_num_seqs=2, scheduler="fifo").start()
        done = threading.Event()
        loop.submit(Request(eng.encode("import os"), 4, SamplingParams(), lambda ev: ev.finish_reason and done.set()))
        assert done.wait(60)
        loop.shutdown()
        during = len(a.steps)
        assert during > 3 and len(b.steps) == during                 # the loop's steps, seen by both
        eng.generate("class A:", max_new_tokens=2)
        assert len(a.steps) == len(b.steps) == during + 2            # the loop's shutdown removed only its own
    assert len(eng.observers) == 0
    with pytest.raises(ValueError, match="already observing"):
        with eng.observing(a), eng.observing(a):
            pass


def test_experts_are_bound_once(eng):
    assert all(block.bound for block in eng.decoder.moe_blocks())
    with pytest.raises(RuntimeError, match="already bound"):
        eng.decoder.bind_experts({block.layer: None for block in eng.decoder.moe_blocks()})


@pytest.mark.skipif(not _ops.HAS_C_EXT, reason="needs moe_engine._C")
def test_kernel_switches_are_read_at_build_not_while_generating(monkeypatch):
    bf16 = moe_engine.load(dtype="bfloat16", progress=False)
    try:
        before = bf16.generate("def fib(n):", max_new_tokens=8)
        monkeypatch.setenv("MOE_ENGINE_LINEAR_KERNEL", "reference")
        monkeypatch.setenv("MOE_ENGINE_QUANT_KERNEL", "reference")
        assert bf16.generate("def fib(n):", max_new_tokens=8) == before
        assert all(m.kernel is _ops.bf16_linear for m in bf16.decoder.modules() if isinstance(m, Linear))
    finally:
        bf16.close()


def test_load_names_unknown_keywords_and_checks_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="unknown keyword.*gpu_memory"):
        moe_engine.load(tmp_path / "missing", gpu_memory="8G")
    with pytest.raises(ConfigError, match="io_threads=0"):
        moe_engine.load(tmp_path / "missing", io_threads=0)


def test_one_size_parser_binary_and_decimal_units():
    assert parse_size("8G") == parse_size("8GiB") == parse_size("8gi") == 8 << 30
    assert parse_size("8GB") == 8 * 10**9 and parse_size("512M") == 512 << 20 and parse_size(4096) == 4096
    assert parse_rate("2.2G", "--bandwidth") == 2.2e9 and parse_rate("2GiB/s", "--bandwidth") == 2 * 2**30
    for bad in ("lots", "-5G", "0", "8X"):
        with pytest.raises(ConfigError, match="gpu_mem"):
            parse_size(bad, "gpu_mem")
