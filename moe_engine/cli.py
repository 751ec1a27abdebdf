"""`moe-engine` command line. The only place flags are parsed; every value is passed on explicitly."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import MoeEngineError


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                   help="Hugging Face checkpoint directory (config.json + *.safetensors) or hub id (org/name: "
                   "downloaded into the Hugging Face cache, or taken from it offline); default: the bundled tiny-moe "
                   "model")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id MODEL_DIR (default: main)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), float32, float16 or bfloat16")
    p.add_argument("--gpu-mem", default=None, help="budget of the compute tier, e.g. 8G, or auto: what this process "
                   "may use (a GPU's free memory; on the CPU the cgroup limit and MemAvailable, less what is in use) "
                   "minus a margin")
    p.add_argument("--cpu-mem", default=None, help="budget of the host tier, e.g. 32G, or auto (as --gpu-mem auto on "
                   "the CPU)")
    p.add_argument("--predictor", default="gate-lookahead", help="expert predictor for prefetching: "
                   "gate-lookahead, learned, path, oracle:TRACE.npz, a plug-in's name, pkg.module:Class, or none")
    p.add_argument("--policy", default=None, help="expert-cache eviction policy (default: the engine's default; "
                   "lru, lfu)")
    p.add_argument("--max-kv-tokens", type=int, default=None, help="KV cache reserve counted in --gpu-mem "
                   "(default: min(context, 4096) tokens)")
    p.add_argument("--io-threads", type=int, default=2, help="expert loader threads")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: the cores this process may "
                   "use: its CPU affinity and cgroup CPU quota; OMP_NUM_THREADS, when set, is kept)")
    p.add_argument("--quant", default=None, help="expert quantization at load: none, int8, int4, int3, int2 or "
                   "mixed:AVG_BITS (a width per expert chosen by an integer program, e.g. mixed:3)")
    p.add_argument("--quant-scope", default="experts", help="what --quant quantizes: experts (default) or all "
                   "(attention, shared experts, dense MLPs and lm_head too, at --quant's width; 8 bits for mixed "
                   "above 4 bits on average, else 4; embeddings, norms and routers stay as they are)")
    p.add_argument("--quant-group", type=int, default=None, help="weights per scale and zero point: 32, 64 "
                   "(default) or 128")
    p.add_argument("--calibration", default=None, help="text file for the calibration run of --quant mixed "
                   "(default: the bundled model's held-out calibration text)")
    p.add_argument("--quant-cache", default=None, help="directory of quantized experts (default: $MOE_ENGINE_CACHE "
                   "or ~/.cache/moe-engine)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars while loading (the placement "
                   "plan still prints)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="N", help="split the routed experts over N "
                   "processes, each with its own --gpu-mem / --cpu-mem (under torchrun: N = WORLD_SIZE; else N-1 "
                   "local workers are started)")
    p.add_argument("--expert-placement", default=None, metavar="TRACE.npz", help="with --expert-parallel: spread "
                   "the experts by their load in this routing trace (default: contiguous shares)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: model's "
                   "generation_config.json, else 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_speculative_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--speculative-config", default=None, metavar="JSON", help="speculative decoding, as vLLM's "
                   "flag: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' (prompt lookup; also "
                   "prompt_lookup_max / prompt_lookup_min), '{\"method\": \"resident\"}' (the model routed among "
                   "its cached experts drafts) or '{\"method\": \"draft_model\", \"model\": DIR}'; greedy "
                   f"output is unchanged, sampling keeps its law; {what}")


def _version() -> str:
    from . import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-engine", description="Run Mixture-of-Experts models whose experts "
                                     "do not fit in fast memory.")
    parser.add_argument("--version", action="version", version=f"moe-engine {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    _add_load_flags(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_sampling_flags(gen)
    _add_speculative_flag(gen, "default: off")

    tr = sub.add_parser("trace", help="record the routing of prompts into a trace file (npz)")
    _add_load_flags(tr)
    tr.add_argument("--prompts", required=True, help="text file, one prompt per line, or .jsonl (a string or "
                    "{\"prompt\": ...} per line)")
    tr.add_argument("--out", required=True, help="trace file to write (.npz)")
    tr.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated (greedy) per prompt")
    tr.add_argument("--max-prompt-tokens", type=int, default=None, help="cut longer prompts to this many tokens")
    tr.add_argument("--router-inputs", action="store_true", help="also store each MoE layer's router input "
                    "(float16; needed to train the learned predictor)")
    tr.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    pf = sub.add_parser("profile", help="run prompts and report hit rates (vs Belady), prefetching, IO, latency "
                        "percentiles and whether the model suits offloading (moe-lrc); optional JSON and plot")
    _add_load_flags(pf)
    pf.add_argument("--prompts", default=None, help="text file, one prompt per line, or .jsonl (as `trace`); "
                    "default: the built-in set of 16 varied prompts")
    pf.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated (greedy) per prompt; "
                    "moe-lrc segments of m tokens need sequences of at least m (m = 4, 16, 64, 256)")
    pf.add_argument("--json", default=None, metavar="OUT.json", help="write the stats + profile JSON here "
                    "(schema: moe_engine/profiling/profile_schema.json)")
    pf.add_argument("--plot", default=None, metavar="OUT.png", help="draw hit rate per layer vs Belady, time per "
                    "token and hit rate vs cache size into a PNG (needs matplotlib)")
    pf.add_argument("--force", action="store_true", help="overwrite --json / --plot files that exist")
    _add_speculative_flag(pf, "the prompts run twice, without and with it, and the report compares acceptance, "
                          "tokens per verify step and expert loads per generated token")

    tp = sub.add_parser("train-predictor", help="train the learned or path predictor from a trace")
    tp.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR", help="checkpoint directory "
                    "(default: the bundled tiny-moe model)")
    tp.add_argument("--trace", required=True, help="trace recorded by `moe-engine trace` (learned needs "
                    "--router-inputs); path accepts any trace")
    tp.add_argument("--kind", choices=("learned", "path"), default="learned", help="which predictor to train")
    tp.add_argument("--depth", type=int, default=2, help="lookahead: how many later MoE layers to predict")
    tp.add_argument("--epochs", type=int, default=None, help="training epochs (default: the predictor's)")
    tp.add_argument("--seed", type=int, default=0, help="random seed")
    tp.add_argument("--out", default=None, help="where to save (default: MODEL_DIR/predictor-KIND.pt, where "
                    "--predictor KIND finds it)")
    tp.add_argument("--force", action="store_true", help="overwrite an existing trained predictor")
    tp.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    _add_simulate_parser(sub)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, models, health, metrics)")
    _add_load_flags(sv)
    _add_serve_flags(sv)
    _add_speculative_flag(sv, "drafts are verified per sequence in the continuous batch (default: off)")
    return parser


def _add_simulate_parser(sub) -> None:
    from .profiling.hardware import PRESETS
    from .profiling.shapes import PRESETS as SHAPES
    sm = sub.add_parser("simulate", help="predict loads, hit rate, stalls and tokens/s of a routing trace on "
                        "modelled hardware, through the engine's own cache policy and predictor code")
    sm.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR", help="checkpoint directory or hub id "
                    "(org/name: its config.json alone is downloaded) whose config.json gives the expert and layer "
                    "sizes (weights not needed); default: the bundled tiny-moe model")
    sm.add_argument("--revision", default=None, help="branch, tag or commit of a hub id MODEL_DIR")
    sm.add_argument("--trace", default=None, help="routing trace (.npz, `moe-engine trace` format); one of another "
                    "model is folded onto this one's shape, with a warning. Default: the bundled model's own trace, or "
                    "synthetic routing for other models (not real routing; a warning says so)")
    sm.add_argument("--model-shape", default=None, help=f"named model shape instead of MODEL_DIR: "
                    f"{', '.join(SHAPES)}")
    sm.add_argument("--expert-bytes", type=int, default=None, help="bytes of one expert instead of MODEL_DIR "
                    "(then only expert time is modelled)")
    sm.add_argument("--quant", type=float, default=None, metavar="BITS", help="expert bits per weight "
                    "(e.g. 4.25 for int4 with group-64 scales); default: the checkpoint's dtype")
    sm.add_argument("--cache-experts", default=None, help="experts cached per layer: 8, 4,8,16, 4-32 or 4-32:4 "
                    "(default: k, 2k, ... E and the moe-lrc suggestion)")
    sm.add_argument("--gpu-mem", default=None, help="compute-tier budget (e.g. 8G) instead of --cache-experts: "
                    "experts per layer as the engine's placement plan gives them (after the non-expert weights, "
                    "--max-kv-tokens of KV cache, IO buffers and workspace)")
    sm.add_argument("--max-kv-tokens", type=int, default=None, help="KV reserve counted in --gpu-mem (default: as "
                    "the engine's, min(context, 4096) tokens)")
    sm.add_argument("--policy", default="default", help="eviction policy: default, lru, lfu")
    sm.add_argument("--predictor", default="none", help="none, oracle (the trace itself), or one that works "
                    "from routing alone (path, path:FILE)")
    sm.add_argument("--hardware", default="this-cpu-disk", help=f"preset: {', '.join(PRESETS)}")
    sm.add_argument("--bandwidth", default=None, help="override the link bandwidth (bytes/s: 2.2G, 25GB, 1.5e9)")
    sm.add_argument("--compute", default=None, help="override the compute rate: bytes of weights a decode "
                    "GEMV streams per second (e.g. 190G)")
    sm.add_argument("--load-latency", type=float, default=None, help="override the seconds per load")
    sm.add_argument("--no-overlap", action="store_true", help="loads do not overlap compute (no async IO)")
    sm.add_argument("--host-compute", default=None, help="hybrid execution: the host CPU computes a missed expert "
                    "streaming its weights at this rate (e.g. 20G) when that beats loading it (default: never)")
    sm.add_argument("--sequences", type=int, default=None, help="simulate only the first N sequences")
    sm.add_argument("--no-reset", action="store_true", help="keep the cache across sequences (default: each "
                    "sequence starts empty)")
    sm.add_argument("--speculative", default=None, metavar="ngram:K", help="also replay the decode with prompt-lookup "
                    "speculative decoding, with and without: drafts of up to K tokens (ngram:K:adaptive: the engine's "
                    "length per step); needs a trace that carries its tokens")
    sm.add_argument("--json", default=None, help="write the results to this JSON file")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch at once")
    p.add_argument("--max-batch", type=int, default=None, help="sequences per decode step (default: "
                   "--max-num-seqs); the scheduler picks which when more are ready")
    p.add_argument("--scheduler", choices=("expert", "fifo"), default="expert", help="which ready sequences "
                   "share a step: expert (fewer distinct experts and misses, bounded waiting) or fifo")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="ids fed per step, decode rows plus "
                   "prompt chunks (vLLM's flag): decode rows first, long prompts prefilled in chunks over several "
                   "steps (default: 512, or 2 x --max-batch if more)")
    p.add_argument("--max-seqs-per-client", type=int, default=None, help="while other clients want seats or "
                   "rows, one client (its API key, else its connection) runs at most N sequences, N rows per step; "
                   "its sequences beyond N yield their seats (recomputed later) (default: --max-num-seqs / 4)")
    p.add_argument("--max-cold-experts", type=int, default=None, help="while others are ready, a sequence that "
                   "would force more than N non-resident experts no other needs waits (up to the scheduler's wait "
                   "bound); only under an expert budget (default: top-k x MoE layers / 2)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per request "
                   "(default: the model's context)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics "
                   "(shows in ps: prefer --api-key-file, MOE_ENGINE_API_KEY or VLLM_API_KEY)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--allow-metrics-without-key", action="store_true", help="serve /metrics without the API key "
                   "(as vLLM does), e.g. for a Prometheus scraper that sends none")
    p.add_argument("--metrics-prefix", choices=("moe_engine", "vllm"), default="moe_engine", help="prefix of the "
                   "vLLM metric names: vllm gives vLLM's exact names, for its Grafana dashboards")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a client has to send a request's "
                   "head, and again its body, before the connection is dropped (default 30)")
    p.add_argument("--served-model-name", default=None, help="model name clients send and /v1/models lists "
                   "(default: the model directory's name)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file for /v1/chat/completions "
                   "(default: the tokenizer's)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds from SIGTERM to exit: running "
                   "requests finish until then, the rest end with finish_reason abort")
    p.add_argument("--allow-unknown-fields", action="store_true", help="drop (and log) request fields this server "
                   "does not know instead of answering 400 (fields it knows but does not implement are still refused)")


def _engine_config(args):
    """The loading flags -> one checked EngineConfig (runtime/config.py), built once per command."""
    from .runtime.config import EngineConfig
    from .runtime.load import model_dir_or_default
    return EngineConfig.from_args(model_dir_or_default(args.model_dir, args.revision, not args.no_progress), args)


def _load(args):
    from .distributed import build_engine
    return build_engine(_engine_config(args), show_plan=True)


def cmd_generate(args) -> int:
    eng = _load(args)
    try:
        start = time.perf_counter()
        pieces = eng.stream(args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=args.stop)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        elapsed = time.perf_counter() - start
        lat = eng.stats()["latency"]
        n = eng.timings.decode_tokens + (1 if eng.timings.steps else 0)
        print(f"[moe-engine] {eng.timings.prompt_tokens} prompt tokens, {n} generated in {elapsed:.2f}s "
              f"(prefill {lat['prefill_tokens_per_s']:.1f} tokens/s, "
              f"decode {lat['decode_tokens_per_s']:.1f} tokens/s, ttft {lat['ttft_s'] * 1000:.0f} ms)", file=sys.stderr)
        if eng.plan is not None:
            st = eng.stats()
            print(f"[moe-engine] expert cache hit rate {st['cache']['hit_rate']:.1%} (Belady "
                  f"{st['optimal']['belady_hit_rate']:.1%}), {st['io']['loads']} loads, "
                  f"{st['io']['bytes_disk_read'] / 2**20:.0f} MiB read, stalled {st['io']['stall_seconds']:.2f}s",
                  file=sys.stderr)
    finally:
        eng.close()
    return 0


def _free_path(path: str, force: bool, flag: str):
    from pathlib import Path

    from .errors import ConfigError
    out = Path(path)
    if out.exists() and not force:
        raise ConfigError(f"{flag} {out} already exists; pass --force to overwrite it or choose another path")
    if not out.parent.is_dir():
        raise ConfigError(f"{flag} {out}: directory {out.parent} does not exist")
    return out


def cmd_trace(args) -> int:
    from .profiling.record import read_prompts, record_trace
    from .profiling.trace import save_trace
    out = _free_path(args.out, args.force, "--out")
    prompts = read_prompts(args.prompts)
    eng = _load(args)
    try:
        ids = [eng.encode(p)[: args.max_prompt_tokens] for p in prompts]
        trace = record_trace(eng, ids, args.max_new_tokens, args.router_inputs, not args.no_progress)
    finally:
        eng.close()
    save_trace(out, trace)
    print(f"[moe-engine] wrote {out}: {trace.num_sequences} sequences, {trace.num_steps} tokens, "
          f"{trace.num_layers} MoE layers x top-{trace.top_k}", file=sys.stderr)
    return 0


def cmd_profile(args) -> int:
    import json

    from .errors import ConfigError
    from .experts.policies import DEFAULT_POLICY
    from .profiling.profile import builtin_prompts, run_profile
    from .profiling.record import read_prompts
    from .profiling.report import print_report
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is invalid: use an integer >= 1")
    out_json = _free_path(args.json, args.force, "--json") if args.json else None
    out_png = _free_path(args.plot, args.force, "--plot") if args.plot else None
    if out_png is not None:
        from .profiling.plot import require_matplotlib
        if out_png.suffix.lower() != ".png":
            raise ConfigError(f"--plot {out_png}: the figure is a PNG; give a path ending in .png")
        require_matplotlib()                          # fail before the run, not after it
    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts} has no prompts; put one prompt per line")
    eng = _load(args)
    try:
        settings = {"model": str(eng.checkpoint.model_dir.name if args.model_dir is None else args.model_dir),
                    "device": str(eng.device), "dtype": str(eng.dtype).removeprefix("torch."),
                    "gpu_mem": args.gpu_mem, "cpu_mem": args.cpu_mem, "predictor": args.predictor,
                    "policy": args.policy or DEFAULT_POLICY, "quant": args.quant or "none",
                    "prompt_file": args.prompts or "built-in", "speculative_config": args.speculative_config}
        profile = run_profile(eng, prompts, args.max_new_tokens, not args.no_progress, settings)
    finally:
        eng.close()
    print_report(profile)
    if out_json is not None:
        out_json.write_text(json.dumps(profile, indent=1) + "\n", encoding="utf-8")
        print(f"[moe-engine] wrote {out_json}", file=sys.stderr)
    if out_png is not None:
        from .profiling.plot import plot_profile
        plot_profile(profile, out_png)
        print(f"[moe-engine] wrote {out_png}", file=sys.stderr)
    return 0


def cmd_train_predictor(args) -> int:
    from .profiling.train import train_predictor
    out = train_predictor(args.model_dir, args.trace, args.kind, args.depth, args.epochs, args.seed, args.out,
                          args.force, not args.no_progress)
    print(f"[moe-engine] saved the {args.kind} predictor to {out}; use it with --predictor "
          f"{args.kind if args.out is None else args.kind + ':' + str(out)}", file=sys.stderr)
    return 0


def _read_chat_template(path: str | None) -> str | None:
    from pathlib import Path

    from .errors import ConfigError
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--chat-template {path}: no such file; give a Jinja template file")
    return Path(path).read_text(encoding="utf-8")


API_KEY_ENV = ("MOE_ENGINE_API_KEY", "VLLM_API_KEY")      # first set wins, after --api-key and --api-key-file


def _api_key(args, environ) -> str | None:
    """The server's key: --api-key, else --api-key-file, else MOE_ENGINE_API_KEY, else VLLM_API_KEY."""
    from pathlib import Path

    from .errors import ConfigError
    if args.api_key is not None and args.api_key_file is not None:
        raise ConfigError("--api-key and --api-key-file both given: keep one")
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise ConfigError(f"--api-key-file {path}: no such file; give a file holding the key on its first line")
        lines = path.read_text(encoding="utf-8").splitlines()
        key, source = (lines[0].strip() if lines else ""), f"--api-key-file {path}"
    else:
        name = next((n for n in API_KEY_ENV if environ.get(n)), None)
        if name is None:
            return None
        key, source = environ[name], name
    if not key or key != key.strip():
        raise ConfigError(f"the API key from {source} is empty or has spaces at its ends; give the key itself")
    return key


def cmd_serve(args) -> int:
    import os
    from pathlib import Path

    from .errors import ConfigError
    from .checkpoint.hub import is_hub_id
    from .distributed import build_engine, run_if_worker
    from .server import create_app, run_server
    if args.model_dir is not None and not is_hub_id(args.model_dir) and not Path(args.model_dir).is_dir():
        raise ConfigError(f"MODEL_DIR {args.model_dir} is not a directory; give a Hugging Face checkpoint directory")

    config = _engine_config(args)                 # every loading flag checked before the server starts
    code = run_if_worker(config)                  # torchrun's ranks other than 0 serve rank 0's experts steps
    if code is not None:
        return code
    app = create_app(engine_factory=lambda: build_engine(config, show_plan=True), served_model_name=args.served_model_name,
                     api_key=_api_key(args, os.environ),
                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                     chat_template=_read_chat_template(args.chat_template), scheduler=args.scheduler,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_seqs_per_client=args.max_seqs_per_client,
                     max_cold_experts=args.max_cold_experts,
                     max_batch=args.max_batch, drain_timeout=args.drain_timeout, read_timeout=args.read_timeout,
                     metrics_prefix=args.metrics_prefix, metrics_without_key=args.allow_metrics_without_key,
                     allow_unknown_fields=args.allow_unknown_fields)
    run_server(app, args.host, args.port)
    return 0


def cmd_simulate(args) -> int:
    import json
    from pathlib import Path

    from .errors import ConfigError
    from .profiling.lrc import lrc_metrics
    from .profiling.sim_report import (parse_cache_sizes, pick_hardware, pick_shape, pick_trace, plan_sizes,
                                       read_trace, render)
    from .profiling.simulate import simulate
    from .profiling.speculation import render_speculative, simulate_speculative, speculative_inputs
    if args.gpu_mem is not None and args.cache_experts is not None:
        raise ConfigError("give --gpu-mem or --cache-experts, not both (--gpu-mem decides the experts per layer)")
    if args.sequences is not None and args.sequences < 1:
        raise ConfigError(f"--sequences {args.sequences}: must be >= 1")
    hw = pick_hardware(args.hardware, args.bandwidth, args.compute, args.load_latency, args.no_overlap,
                       args.host_compute)
    given = read_trace(args.trace) if args.trace is not None else None
    shape, model_dir = pick_shape(given, args.model_dir, args.model_shape, args.expert_bytes, args.quant,
                                  args.revision)
    bundled = args.model_dir is None and args.model_shape is None and args.expert_bytes is None
    trace, source = pick_trace(given, args.trace, shape, bundled)
    trace.num_experts = max(int(trace.num_experts), shape.num_experts)
    if args.sequences is not None:
        trace = trace.sequences(0, min(args.sequences, trace.num_sequences))
    lrc = lrc_metrics(trace)
    if args.gpu_mem is not None:
        sizes = plan_sizes(shape, args.gpu_mem, args.max_kv_tokens, hw.device)
    else:
        sizes = parse_cache_sizes(args.cache_experts, trace.top_k, shape.num_experts, lrc["suggested_cache_experts"])
    spec = None if args.speculative is None else speculative_inputs(args.speculative, args.trace, bundled,
                                                                     args.predictor, trace)
    print(f"[moe-engine] {source}", file=sys.stderr)            # every value checked: say where the routing is from
    report = simulate(trace, shape, hw, sizes, args.policy, args.predictor, not args.no_reset, model_dir)
    report["lrc"] = lrc
    report["trace_source"] = source
    render(report)
    if spec is not None:
        report["speculative"] = simulate_speculative(trace, spec[1], shape, hw, sizes, spec[0], args.policy,
                                                     not args.no_reset)
        render_speculative(report["speculative"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


COMMANDS = {"generate": cmd_generate, "trace": cmd_trace, "profile": cmd_profile, "simulate": cmd_simulate,
            "train-predictor": cmd_train_predictor, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MoeEngineError as e:
        from .config import cli_words
        from .runtime.load import FLAG_KEYWORDS
        print(f"moe-engine: error: {cli_words(str(e), FLAG_KEYWORDS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
