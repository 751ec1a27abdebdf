"""The runtime: configuration, building the engine, and generating with it.

    config.py      EngineConfig / OffloadConfig / KernelConfig: frozen, checked once (load() keywords, CLI flags)
    resources.py   what this process may use: memory (--gpu-mem auto: cgroup, MemAvailable, RSS), cores (threads)
    load.py        load() -> build_engine(config): checkpoint, tokenizer, quantized experts, plan, decoder, cache
    build.py       the decoder with its kernels, the expert cache, and bind_experts (the seam, set once)
    engine.py      Engine: text <-> ids (prompts.py), generate / stream / logits / stats, observers
    core.py        the generation core: Sequence + GenerationCore.step(seqs) over per-sequence KV (kv_cache.py);
                   a sequence may feed several tokens in one step (prefill, a chunk, speculative verification)
    generation.py  the caller's-thread drivers: lockstep (generate / stream) and scheduled (generate(max_batch))
    batching.py    Batcher: admission, grouped prefills, the scheduler's pick, schedule hints (no threads)
    loop.py        EngineLoop: the server's thread around a Batcher; Request / Event
    textstream.py  incremental detokenization + stop-string hold-back; stopping.py, sampling.py per sequence
    forecast.py    the predictor feed's safety net; plugins.py: --predictor names -> predictor objects
"""
