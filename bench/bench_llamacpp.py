"""moe-engine vs llama.cpp (llama-cpp-python) on the same checkpoint: decode and prefill all in RAM at bf16 / int8 /
int4, under a memory limit with a cold cache, and with a competing CPU load. Reruns the whole comparison table.

Rerun the table (each command makes the GGUFs it needs first, see "GGUFs" below; add --no-record to only print):

  M=/work/bench_data/mixtral-1.4g     # in-RAM rows; the 4.5 GB /work/bench_data/mixtral-4g for the memory-limited
                                      # ones (both made by make_checkpoint.py, commands in its docstring)
  python bench/bench_llamacpp.py --engine-model $M --precisions bf16 int8 int4 --threads 2 1         # decode in RAM
  python bench/bench_llamacpp.py --engine-model $M --mode prefill --n-prompt 16 512 --threads 2 1    # prefill
  python bench/bench_llamacpp.py --engine-model /work/bench_data/mixtral-4g --mode memcg --mem-limits 0.4 0.6 \
      --allowance 0 --precisions bf16 --threads 2 --n-decode 16 --warmup-decode 2 --repeats 2        # memory-limited
  python bench/bench_llamacpp.py --engine-model /work/bench_data/mixtral-32e --mode memcg --mem-limits 0.4 0.6 \
      --allowance 0 --precisions int4 --threads 2 --n-decode 16 --warmup-decode 2 --repeats 2 \
      --llama-bufts none        # int4: llama.cpp as plain mmap (its repacking would copy the experts into RAM)
  python bench/bench_llamacpp.py --engine-model $M --competing-load --threads 2 1                    # one busy core
  python bench/bench_llamacpp.py --engine-model $M --precisions int8-all int4-all --threads 2 1      # all quantized
  python bench/bench_llamacpp.py --threads 1 --n-decode 4 --repeats 1 --warmup-decode 1 --no-record   # quick check

Rows (--precisions; engine side / llama.cpp side):
  bf16       the checkpoint as it is (bf16)           / the converter's bf16 GGUF
  int8       quant="int8": experts int8, dense bf16   / Q8_0 experts, dense bf16 (the same bytes per token)
  int4       quant="int4": experts int4, dense bf16   / Q4_0 experts, dense bf16
  int8-all   quant="int8", quant_scope="all"          / llama-quantize's standard Q8_0 file (dense quantized too)
  int4-all   quant="int4", quant_scope="all"          / standard Q4_0 (its mix: output Q6_K, attn_k/v Q8_0)
The engine's quantized experts are built once into --quant-cache (default /work/bench_data/quant-cache); the
*-all rows need moe_engine.load's quant_scope keyword.

Protocol (--mode decode, the default): load both sides in this process (llama_cpp.Llama(n_ctx >= 512,
n_threads=T, use_mmap=True), moe_engine.load(device="cpu", all experts in RAM)), warm up (one prefill plus
--warmup-decode steps), then --repeats runs interleaved run by run (llama.cpp, engine, llama.cpp, ...: the VM's
memory bandwidth drifts between minutes, runs side by side see the same machine). A run: prefill a fixed random
prompt (numpy seed 0, ids in [100, 32000)), sample greedily, then --n-decode single-token greedy steps, timed.
EOS is never checked. Engine decode = time(prompt + n_decode + 1 new) - time(prompt + 1 new). The ratio is
engine / llama.cpp of the medians, and run by run (each engine run over the llama.cpp run just before it).
Each thread count also measures the machine's memory read bandwidth (torch.sum over 512 MiB, best of 3, that many
threads) and reports each side's weight bytes per decode token (dense weights + one embedding row + top-k experts
per layer; KV reads not counted) and tok/s as a share of the bound bandwidth / bytes-per-token ("% of bound").

  --mode prefill   the same, timing only the prefill (+ the first sample) of each --n-prompt (default 16 512)
  --mode memcg     each run its own process under ../shared/tools/in_memcg.sh (bench_offload.launch_cmd), the
                   page cache cleared of the run's files first (cold): limit = fraction x GGUF file size +
                   --allowance (Python runtime, default bench_offload.RUNTIME_ALLOWANCE), the same limit for both
                   sides; llama.cpp maps the GGUF (use_mmap), the engine runs at gpu_mem=--engine-gpu-mem ("auto":
                   the engine sizes its budget itself). Runs alternate llama.cpp / engine --repeats times.
  --competing-load a CPU-bound process (numpy matmuls on 128x128, one BLAS thread) pinned to --busy-core (default
                   the last core) runs during half the runs (SIGCONT / SIGSTOP): each repeat is quiet llama.cpp,
                   quiet engine, loaded llama.cpp, loaded engine. Reported: each side's slowdown 1 - loaded / quiet
                   (medians) and engine / llama.cpp quiet and loaded. decode and prefill modes.

GGUFs (bench/llamacpp_gguf.py): --model names one GGUF for a single precision; otherwise each precision's GGUF is
made from --engine-model and cached beside it (or under --gguf-dir), keyed by the checkpoint files' sizes and
mtimes (stale ones are rebuilt): the bf16 one with llama.cpp's convert_hf_to_gguf.py (--converter,
$LLAMA_CPP_CONVERTER or the llama-cpp-python 0.3.36 sdist under /tmp/x; `pip download --no-binary :all:
--no-deps llama-cpp-python==0.3.36` gets it) and bench/llama_tokenizer.py's tokenizer (the checkpoint must have
vocab 32000), the others with llama_cpp.llama_model_quantize. Only-experts quantization is possible: pure Q8_0 /
Q4_0 plus BF16 for token_embd/output (token_embedding_type / output_tensor_type) and the attention weights (a
tt_overrides pattern). `python bench/llamacpp_gguf.py MODEL_DIR --variants ...` makes them alone.

llama.cpp's buffer types (--llama-bufts, default auto): this llama-cpp-python build has AMX kernels, and on this VM
(which advertises AMX) they crash on 2-D Q8_0 / Q4_0 weights (SIGILL / SIGSEGV; the experts-only and bf16 GGUFs
never reach them: AMX takes no 3-D or bf16 tensors). auto probes each GGUF in a child process and, if that
crashes, pins those weights to the plain CPU buffer type ("no-amx"; the experts keep llama.cpp's repacking); the
JSON lines and the RESULTS notes say which was used.

One JSON line is printed per row and side, then the markdown table; the run is appended to bench/RESULTS.md
(bench/results.py) unless --no-record. When llama-cpp-python cannot be imported or a GGUF cannot be made, the
script says why and what to run, and records that instead of numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

MODES = ("decode", "prefill", "memcg")
# precision -> (engine quant, engine quant_scope, GGUF variant of llamacpp_gguf.VARIANTS)
PRECISIONS = {"bf16": (None, None, "bf16"), "int8": ("int8", None, "q8_0-experts"),
              "int4": ("int4", None, "q4_0-experts"), "int8-all": ("int8", "all", "q8_0"),
              "int4-all": ("int4", "all", "q4_0")}
DEFAULT_MODEL = "/work/bench_data/mixtral-1.4g"
BUFTS = ("auto", "default", "no-amx", "none")        # --llama-bufts
AMX_TENSORS = rb"attn_|token_embd|^output\."        # what "no-amx" keeps off the AMX buffer type (std::regex)
BUSY = """import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
import numpy as np
a = np.random.default_rng(0).random((128, 128))
print("ready", flush=True)
while True:
    b = a @ a
"""


def prompt_ids(seed: int, n_prompt: int, n_vocab: int) -> list[int]:
    """The benchmark prompt: the same ids for llama.cpp and the engine."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(100, min(32000, n_vocab), size=n_prompt)]


# ---- the two sides: load once, warm up, then run() one timed repeat ------------------------------
def run_one(llm, llama_cpp, sampler, prompt, n_decode):
    """Returns (prefill_seconds, decode_seconds, generated_token_ids)."""
    llm.reset()  # n_tokens = 0; the next eval() drops the KV cache from position 0
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n_decode):
        llm.eval([tok])
        tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
        out.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def context_size(n_prompt: int, n_decode: int) -> int:
    """llama.cpp's n_ctx: at least 512, room for the prompt and every decoded token, a multiple of 256."""
    need = n_prompt + n_decode + 1
    return max(512, -(-need // 256) * 256)


@contextlib.contextmanager
def buffer_types(bufts: str):
    """llama.cpp's weight buffer types while a Llama is built (llama-cpp-python exposes neither knob):
    "default" as llama.cpp picks (AMX, then CPU_REPACK, then plain CPU); "no-amx": the weights the AMX buffer
    type would take (2-D attention, token_embd, output) pinned to the plain CPU buffer type by a tensor buffer
    override, the experts still repacked; "none": use_extra_bufts = False (no AMX, no repacking)."""
    if bufts == "default":
        yield
        return
    import ctypes

    import llama_cpp.llama_cpp as lib
    keep, orig = [], lib.llama_model_default_params

    def params():
        p = orig()
        if bufts == "none":
            p.use_extra_bufts = False
        else:
            base = ctypes.CDLL(str(Path(lib.__file__).parent / "lib" / "libggml-base.so"))
            base.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p

            class Override(ctypes.Structure):    # llama.h: struct llama_model_tensor_buft_override
                _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]
            table = (Override * 2)(Override(AMX_TENSORS, base.ggml_backend_cpu_buffer_type()), Override(None, None))
            keep.append(table)
            p.tensor_buft_overrides = ctypes.cast(table, ctypes.c_void_p)
        return p
    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = orig


def probe_bufts(gguf: str) -> str:
    """"default" when llama.cpp runs the GGUF with its own buffer types, else "no-amx". On a CPU that reports
    AMX_INT8, llama.cpp's AMX kernels for 2-D Q8_0 / Q4_0 weights can crash (SIGILL / SIGSEGV: seen on this VM,
    whose hypervisor advertises AMX), so a 4-token eval is tried first in a child process."""
    import llama_cpp
    if "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode(errors="replace"):
        return "default"
    code = ("import sys; from llama_cpp import Llama; "
            "Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False).eval([100, 200, 300, 400])")
    proc = subprocess.run([sys.executable, "-c", code, gguf], capture_output=True, check=False)
    if proc.returncode == 0:
        return "default"
    print(f"llama.cpp with its default buffer types failed on {gguf} (exit {proc.returncode}: AMX); "
          f"running it with --llama-bufts no-amx", file=sys.stderr, flush=True)
    return "no-amx"


class LlamaCppSide:
    name = "llama.cpp"

    def __init__(self, gguf, n_threads, n_batch, n_prompt, n_decode, warmup_decode, seed, bufts="default"):
        import llama_cpp
        from llama_cpp import Llama

        self.llama_cpp, self.gguf, self.n_threads, self.n_batch = llama_cpp, str(gguf), n_threads, n_batch
        self.n_prompt, self.n_decode, self.bufts = n_prompt, n_decode, bufts
        t0 = time.perf_counter()
        with buffer_types(bufts):
            self.llm = Llama(model_path=self.gguf, n_ctx=context_size(n_prompt, max(n_decode, warmup_decode)),
                             n_threads=n_threads, n_threads_batch=n_threads, n_batch=n_batch, n_ubatch=n_batch,
                             logits_all=False, use_mmap=True, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.prompt = prompt_ids(seed, n_prompt, self.llm.n_vocab())
        self.sampler = llama_cpp.llama_sampler_init_greedy()
        run_one(self.llm, llama_cpp, self.sampler, self.prompt, warmup_decode)   # page in, build graphs, threads

    def run(self) -> dict:
        p, d, out = run_one(self.llm, self.llama_cpp, self.sampler, self.prompt, self.n_decode)
        assert len(out) == self.n_decode + 1
        return {"prefill_s": p, "decode_s": d, "tokens": out}

    def info(self) -> dict:
        from llamacpp_gguf import weights_read_per_token
        return {"gguf": self.gguf, "gguf_bytes": os.path.getsize(self.gguf), "n_batch": self.n_batch,
                "llama_bufts": self.bufts,
                "load_s": round(self.load_s, 3), "bytes_per_token": weights_read_per_token(self.gguf),
                "llama_cpp_python": self.llama_cpp.__version__,
                "system_info": self.llama_cpp.llama_print_system_info().decode(errors="replace").strip()}

    def close(self) -> None:
        self.llama_cpp.llama_sampler_free(self.sampler)
        del self.llm


class EngineSide:
    name = "moe-engine"

    def __init__(self, model_dir, n_threads, n_prompt, n_decode, warmup_decode, seed, quant=None, quant_scope=None,
                 quant_cache=None, gpu_mem=None):
        import torch

        import moe_engine
        torch.set_num_threads(n_threads)
        self.n_threads, self.n_prompt, self.n_decode = n_threads, n_prompt, n_decode
        kw = {"quant": quant, "quant_cache": quant_cache} if quant else {}
        if quant_scope:
            kw["quant_scope"] = quant_scope
        if gpu_mem is not None:   # a budget: the KV reserve is llama.cpp's context (n_ctx), not the 4096 default
            kw["gpu_mem"] = gpu_mem
            kw["max_kv_tokens"] = context_size(n_prompt, max(n_decode, warmup_decode))
        t0 = time.perf_counter()
        self.eng = moe_engine.load(model_dir, device="cpu", progress=False, **kw)
        self.load_s = time.perf_counter() - t0
        self.ids = torch.tensor([prompt_ids(seed, n_prompt, self.eng.spec.vocab_size)])
        self._timed(warmup_decode + 1)

    def _timed(self, new):
        t0 = time.perf_counter()
        out = self.eng.generate(self.ids, max_new_tokens=new, do_sample=False, eos_token_id=[])
        return time.perf_counter() - t0, out[0, self.n_prompt:].tolist()

    def run(self) -> dict:
        t1, out = self._timed(1)
        if self.n_decode == 0:
            return {"prefill_s": t1, "decode_s": 0.0, "tokens": out}
        tn, out = self._timed(self.n_decode + 1)
        return {"prefill_s": t1, "decode_s": max(tn - t1, 1e-9), "tokens": out}

    def info(self) -> dict:
        return {"dtype": str(self.eng.dtype).replace("torch.", ""), "quant": (self.eng.quant or {}).get("name"),
                "load_s": round(self.load_s, 3),
                "bytes_per_token": engine_bytes_per_token(self.eng)
                if self.eng.plan is None or self.eng.plan.all_resident else None}

    def close(self) -> None:
        self.eng.close()


def engine_bytes_per_token(eng) -> int:
    """Weight bytes one decode token reads with every expert resident: the decoder's tensors (dense weights in
    whatever format, quantized ones are buffers) less the embedding table plus one row (unless tied to lm_head),
    plus top-k experts per MoE layer at their stored size (experts.nbytes() / experts)."""
    dense = sum(t.numel() * t.element_size() for t in (*eng.decoder.parameters(), *eng.decoder.buffers()))
    emb = eng.decoder.embed.weight
    if not eng.spec.tie_word_embeddings:
        dense -= emb.numel() * emb.element_size() - emb.shape[-1] * emb.element_size()
    layers, moe = len(eng.spec.moe_layers), eng.spec.moe
    per_expert = eng.experts.nbytes() / (layers * moe.num_experts)
    return int(dense + layers * moe.top_k * per_expert)


def read_bandwidth(threads: int, nbytes: int = 512 << 20, repeats: int = 3) -> float:
    """Memory read bandwidth (bytes/s): torch.sum over `nbytes` of float32 on `threads` threads, best of `repeats`
    (the figure RESULTS.md quotes for this VM: ~37 GB/s on one thread, ~46 GB/s on two)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return nbytes / best


# ---- summaries and tables ------------------------------------------------------------------------
def summarize(runs: list[dict], n_prompt: int, n_decode: int) -> dict:
    """Medians and every run of a side's runs (run(): prefill_s, decode_s, tokens)."""
    pre = [n_prompt / r["prefill_s"] for r in runs]
    out = {"prefill_tokens_per_s": round(statistics.median(pre), 3), "prefill_runs": [round(x, 3) for x in pre],
           "deterministic": all(r["tokens"] == runs[0]["tokens"] for r in runs)}
    if n_decode:
        dec = [n_decode / r["decode_s"] for r in runs]
        out.update(decode_tokens_per_s=round(statistics.median(dec), 3), runs=[round(x, 3) for x in dec])
    return out


def metric(mode: str) -> str:
    return "prefill_tokens_per_s" if mode == "prefill" else "decode_tokens_per_s"


def runs_of(res: dict, mode: str) -> list[float]:
    return res["prefill_runs"] if mode == "prefill" else res["runs"]


def slowdown(quiet: float, loaded: float) -> float:
    """Share of speed lost to the competing load: 1 - loaded / quiet."""
    return 1.0 - loaded / quiet


def memcg_limit(fraction: float, file_bytes: int, allowance: int) -> int:
    """The memory-limited rows' cgroup limit: a fraction of the GGUF file plus the Python runtime's allowance."""
    if not fraction > 0:
        raise ValueError(f"--mem-limits: fractions must be > 0, got {fraction}")
    return int(fraction * file_bytes) + allowance


def _runs(xs) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def _pct(tps, bpt, bw) -> str:
    return f"{tps * bpt / bw:.0%}" if tps and bpt and bw else ""


def table(rows: list[dict], mode: str) -> str:
    """rows: {"precision", "threads", "n_prompt", "llama": result, "engine": result or None, "read_bw"}."""
    key, what = metric(mode), ("prefill" if mode == "prefill" else "decode")
    head = (f"| precision | threads | prompt | llama.cpp {what} tok/s (runs) | moe-engine {what} tok/s (runs) | "
            f"engine / llama.cpp (medians) | run-by-run ratios (median) |")
    if mode == "decode":
        head += " read GB/s | engine MB/token | engine % of bound | llama.cpp MB/token | llama.cpp % of bound |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in rows:
        lc, en = r["llama"], r["engine"]
        cells = [r["precision"], str(r["threads"]), str(r["n_prompt"]),
                 f"{lc[key]:.1f} ({_runs(runs_of(lc, mode))})"]
        if en:
            paired = [e / c for e, c in zip(runs_of(en, mode), runs_of(lc, mode))]
            cells += [f"{en[key]:.1f} ({_runs(runs_of(en, mode))})", f"**{en[key] / lc[key]:.2f}x**",
                      f"{', '.join(f'{x:.2f}' for x in paired)} ({statistics.median(paired):.2f}x)"]
        else:
            cells += ["not run", "", ""]
        if mode == "decode":
            bw, ebpt, lbpt = r.get("read_bw"), (en or {}).get("bytes_per_token"), lc.get("bytes_per_token")
            cells += [f"{bw / 1e9:.1f}" if bw else "", f"{ebpt / 1e6:.0f}" if ebpt else "",
                      _pct(en and en[key], ebpt, bw), f"{lbpt / 1e6:.0f}" if lbpt else "", _pct(lc[key], lbpt, bw)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_table(rows: list[dict], mode: str) -> str:
    """--competing-load: each side quiet and loaded, its slowdown, and engine / llama.cpp both ways."""
    key = metric(mode)
    lines = ["| precision | threads | prompt | llama.cpp quiet | llama.cpp loaded | llama.cpp slowdown | engine quiet | "
             "engine loaded | engine slowdown | engine / llama.cpp quiet | engine / llama.cpp loaded |", "|---" * 11 + "|"]
    for r in rows:
        lq, ll, eq, el = r["llama"], r["llama_loaded"], r["engine"], r["engine_loaded"]
        cells = [r["precision"], str(r["threads"]), str(r["n_prompt"]), f"{lq[key]:.1f}", f"{ll[key]:.1f}",
                 f"{slowdown(lq[key], ll[key]):.0%}"]
        if eq:
            cells += [f"{eq[key]:.1f}", f"{el[key]:.1f}", f"{slowdown(eq[key], el[key]):.0%}",
                      f"{eq[key] / lq[key]:.2f}x", f"{el[key] / ll[key]:.2f}x"]
        else:
            cells += ["not run"] + [""] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failure(runs: list[dict]) -> str:
    """The last line of the first failed run's output, fit for a table cell."""
    err = next((x["error"] for x in runs if "error" in x), "").strip()
    return (err.splitlines() or ["?"])[-1][:160].replace("|", "/")


def memcg_table(rows: list[dict]) -> str:
    lines = ["| precision | threads | memcg limit (GGUF fraction + allowance) | llama.cpp decode tok/s (runs) | moe-engine decode tok/s (runs) | "
             "engine / llama.cpp (medians) | llama.cpp peak | engine peak |", "|---" * 8 + "|"]
    for r in rows:
        cells = [r["precision"], str(r["threads"]),
                 f"{r['limit'] / 2**30:.2f} GiB ({r['fraction']:.0%} + {r['allowance'] / 2**20:.0f} MiB)"]
        med = {}
        for side in ("llama", "engine"):
            ok = [x["decode_tokens_per_s"] for x in r[side] if "error" not in x]
            if ok:
                med[side] = statistics.median(ok)
                cells.append(f"{med[side]:.2f} ({', '.join(f'{x:.2f}' for x in ok)})")
            else:
                cells.append("error: " + failure(r[side]) if r[side] else "not run")
        cells.append(f"**{med['engine'] / med['llama']:.2f}x**" if len(med) == 2 else "")
        for side in ("llama", "engine"):
            peaks = [x["memcg_peak"] for x in r[side] if "memcg_peak" in x]
            cells.append(f"{max(peaks) / 2**30:.2f} GiB" if peaks else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the competing load --------------------------------------------------------------------------
class Busy:
    """A CPU-bound process pinned to one core, stopped (SIGSTOP) except inside `with busy:`."""

    def __init__(self, core: int):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.core = core
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY, str(core)], stdout=subprocess.PIPE, text=True,
                                     env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the competing-load process did not start (exit {self.proc.poll()})")
        self.proc.send_signal(signal.SIGSTOP)

    def __enter__(self):
        self.proc.send_signal(signal.SIGCONT)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGSTOP)

    def close(self):
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()


# ---- checks and GGUFs ----------------------------------------------------------------------------
def check_args(args) -> str | None:
    """What is wrong with the flags' combination (None when nothing is)."""
    for flag in ("threads", "n_prompt", "mem_limits"):
        bad = [x for x in (getattr(args, flag) or []) if not x > 0]
        if bad:
            return f"--{flag.replace('_', '-')} values must be > 0, got {bad}"
    for flag in ("repeats", "n_batch"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
    if args.n_decode < 0 or args.warmup_decode < 0:
        return "--n-decode and --warmup-decode must be >= 0"
    if args.mode != "prefill" and args.n_decode < 1:
        return f"--mode {args.mode} times decode steps: --n-decode must be >= 1"
    if args.model and len(args.precisions) > 1:
        return ("--model names one GGUF, for one precision; with several --precisions let the script make "
                "each one from --engine-model (cached beside it or under --gguf-dir)")
    if args.mode == "memcg" and args.competing_load:
        return "--competing-load runs in the decode and prefill modes, not with --mode memcg"
    if args.mode == "memcg" and args.no_engine:
        return "--mode memcg compares both sides under one limit; --no-engine has nothing to compare"
    if args.mem_limits and args.mode != "memcg":
        return "--mem-limits is for --mode memcg"
    if args.mode == "memcg" and len(args.n_prompt or []) > 1:
        return "--mode memcg takes one --n-prompt"
    return None


def resolve_ggufs(args) -> dict[str, Path]:
    """precision -> GGUF path: --model for the one precision, else made / reused by llamacpp_gguf."""
    if args.model:
        return {args.precisions[0]: Path(args.model)}
    from llamacpp_gguf import ensure_gguf
    return {p: ensure_gguf(args.engine_model, PRECISIONS[p][2], args.gguf_dir, args.converter)
            for p in args.precisions}


def unavailable(args) -> tuple[str | None, dict]:
    """(why llama.cpp cannot be measured here or None, precision -> GGUF)."""
    try:
        import llama_cpp
    except ImportError as e:
        return (f"llama-cpp-python cannot be imported ({e}); build it from the registry with "
                f"`pip install llama-cpp-python` (needs a C++ compiler and cmake), see this script's docstring"), {}
    try:
        ggufs = resolve_ggufs(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return f"no GGUF (llama-cpp-python {llama_cpp.__version__} is installed): {e}", {}
    missing = [str(p) for p in ggufs.values() if not p.is_file()]
    if missing:
        return f"no GGUF at {', '.join(missing)}; pass another --model or let the script make it", {}
    return None, ggufs


# ---- in-process modes ----------------------------------------------------------------------------
def resolve_bufts(args, ggufs) -> dict[str, str]:
    """precision -> llama.cpp buffer types: --llama-bufts, or for auto what probe_bufts finds for the GGUF."""
    return {p: probe_bufts(str(g)) if args.llama_bufts == "auto" else args.llama_bufts for p, g in ggufs.items()}


def run_in_process(args, ggufs) -> tuple[list[dict], str]:
    mode = args.mode
    n_decode = 0 if mode == "prefill" else args.n_decode
    bufts = resolve_bufts(args, ggufs)
    busy = Busy(args.busy_core) if args.competing_load else None
    rows = []
    try:
        for prec in args.precisions:
            quant, scope, _ = PRECISIONS[prec]
            for t in args.threads:
                bw = read_bandwidth(t) if mode == "decode" else None
                for n_prompt in args.n_prompt:
                    lc = LlamaCppSide(ggufs[prec], t, args.n_batch, n_prompt, n_decode, args.warmup_decode,
                                      args.seed, bufts[prec])
                    en = None if args.no_engine else EngineSide(
                        args.engine_model, t, n_prompt, n_decode, args.warmup_decode, args.seed, quant, scope,
                        args.quant_cache)
                    sides = [s for s in (lc, en) if s is not None]
                    quiet = {s.name: [] for s in sides}
                    loaded = {s.name: [] for s in sides}
                    for _ in range(args.repeats):   # interleaved: the VM's memory bandwidth drifts between minutes
                        for s in sides:
                            quiet[s.name].append(s.run())
                        if busy is not None:
                            with busy:
                                for s in sides:
                                    loaded[s.name].append(s.run())
                    row = {"precision": prec, "threads": t, "n_prompt": n_prompt, "read_bw": bw, "engine": None}
                    for s in sides:
                        k = "llama" if s is lc else "engine"
                        base = {"engine": s.name, "mode": mode, "precision": prec, "n_threads": t,
                                "n_prompt": n_prompt, "n_decode": n_decode, **s.info()}
                        row[k] = {**base, **summarize(quiet[s.name], n_prompt, n_decode)}
                        if bw:
                            row[k]["read_bytes_per_s"] = bw
                        print(json.dumps(row[k]), flush=True)
                        if busy is not None:
                            row[k + "_loaded"] = {**base, "competing_load_core": busy.core,
                                                  **summarize(loaded[s.name], n_prompt, n_decode)}
                            print(json.dumps(row[k + "_loaded"]), flush=True)
                    rows.append(row)
                    for s in sides:
                        s.close()
    finally:
        if busy is not None:
            busy.close()
    text = table(rows, mode)
    if busy is not None:
        text += "\n\nWith a competing CPU load on core %d:\n\n" % busy.core + load_table(rows, mode)
    return rows, text


def compare_in_process(rows: list[dict], mode: str) -> str:
    key = metric(mode)
    parts = []
    for r in rows:
        if r["engine"]:
            s = (f"{r['precision']}, {r['threads']} thread(s), {r['n_prompt']}-token prompt: engine / llama.cpp "
                 f"{r['engine'][key] / r['llama'][key]:.2f}x")
            if "engine_loaded" in r:
                s += (f" (slowdown under load: engine {slowdown(r['engine'][key], r['engine_loaded'][key]):.0%}, "
                      f"llama.cpp {slowdown(r['llama'][key], r['llama_loaded'][key]):.0%})")
            parts.append(s)
    return "; ".join(parts) or "moe-engine not run (--no-engine)"


# ---- memory-limited mode: one process per run ----------------------------------------------------
def one(args) -> int:
    """--one llama|engine: one measured run in this process (under in_memcg.sh), printed as RESULT {json}."""
    n_prompt = args.n_prompt[0]
    if args.one == "llama":
        bufts = probe_bufts(args.model) if args.llama_bufts == "auto" else args.llama_bufts
        side = LlamaCppSide(args.model, args.threads[0], args.n_batch, n_prompt, args.n_decode, args.warmup_decode,
                            args.seed, bufts)
    else:
        quant, scope, _ = PRECISIONS[args.precisions[0]]
        side = EngineSide(args.engine_model, args.threads[0], n_prompt, args.n_decode, args.warmup_decode, args.seed,
                          quant, scope, args.quant_cache, args.engine_gpu_mem)
    res = summarize([side.run()], n_prompt, args.n_decode)
    res["load_s"] = round(side.load_s, 3)
    if args.one == "llama":
        res["llama_bufts"] = side.bufts
    side.close()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def engine_cold_files(args, quant) -> list[str]:
    """What the engine reads from disk, to evict before its run: the checkpoint and its quantized-expert entry
    (built here, outside the limit, when missing)."""
    files = [args.engine_model]
    if quant:
        from moe_engine.checkpoint import Checkpoint
        from moe_engine.quant.prepare import quantized_experts
        from moe_engine.quant.settings import parse_quant
        ckpt = Checkpoint(args.engine_model)
        try:
            qe = quantized_experts(ckpt, parse_quant(quant), args.quant_cache)
            files.append(str(qe.entry))
            qe.close()
        finally:
            ckpt.close()
    return files


def run_memcg(args, ggufs) -> tuple[list[dict], str]:
    from bench_offload import launch_cmd
    me = str(Path(__file__).resolve())
    common = ["--n-prompt", str(args.n_prompt[0]), "--n-decode", str(args.n_decode), "--warmup-decode",
              str(args.warmup_decode), "--seed", str(args.seed), "--n-batch", str(args.n_batch)]
    rows, bufts = [], resolve_bufts(args, ggufs)
    for prec in args.precisions:
        quant, _, _ = PRECISIONS[prec]
        cold = engine_cold_files(args, quant)
        size = os.path.getsize(ggufs[prec])
        for frac in args.mem_limits:
            limit = memcg_limit(frac, size, args.allowance)
            for t in args.threads:
                row = {"precision": prec, "threads": t, "fraction": frac, "limit": limit, "allowance": args.allowance,
                       "gguf_bytes": size, "llama": [], "engine": []}
                for _ in range(args.repeats):
                    row["llama"].append(launch_cmd(limit, [sys.executable, me, "--one", "llama", "--model",
                                                           str(ggufs[prec]), "--threads", str(t), "--llama-bufts",
                                                           bufts[prec], *common],
                                                   [str(ggufs[prec])]))
                    row["engine"].append(launch_cmd(limit, [sys.executable, me, "--one", "engine", "--engine-model",
                                                            args.engine_model, "--precisions", prec, "--threads",
                                                            str(t), "--engine-gpu-mem", args.engine_gpu_mem,
                                                            "--quant-cache", args.quant_cache, *common], cold))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows, memcg_table(rows)


def compare_memcg(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        med = [statistics.median(x["decode_tokens_per_s"] for x in r[s] if "error" not in x)
               if any("error" not in x for x in r[s]) else None for s in ("engine", "llama")]
        what = f"{med[0] / med[1]:.2f}x" if all(med) else "a side failed"
        parts.append(f"{r['precision']}, {r['threads']} thread(s), limit {r['fraction']:.0%} of the GGUF + allowance: "
                     f"engine / llama.cpp {what}")
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="decode")
    ap.add_argument("--precisions", nargs="+", default=["bf16"], choices=list(PRECISIONS))
    ap.add_argument("--model", default=None, help="a GGUF to use as is, for a single --precisions value "
                                                  "(default: made from --engine-model, see the docstring)")
    ap.add_argument("--engine-model", default=DEFAULT_MODEL,
                    help="the safetensors checkpoint; moe-engine runs it, the GGUFs are made from it")
    ap.add_argument("--gguf-dir", default=None, help="where made GGUFs go (default: beside --engine-model)")
    ap.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py (default "
                                                      "$LLAMA_CPP_CONVERTER or the llama-cpp-python sdist in /tmp/x)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="thread counts to measure, rows each (default: 2 1)")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-prompt", type=int, nargs="+", default=None,
                    help="prompt lengths (default: 16; --mode prefill: 16 512)")
    ap.add_argument("--n-decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-decode", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant-cache", default="/work/bench_data/quant-cache",
                    help="the engine's quantized-expert cache (int8 / int4 rows)")
    ap.add_argument("--mem-limits", type=float, nargs="+", default=None,
                    help="--mode memcg: cgroup limits as fractions of the row's GGUF file size (default 0.4 0.6)")
    ap.add_argument("--allowance", type=int, default=None,
                    help="--mode memcg: bytes added to each limit for the Python runtime "
                         "(default bench_offload.RUNTIME_ALLOWANCE, 450 MiB)")
    ap.add_argument("--engine-gpu-mem", default="auto", help="--mode memcg: the engine's gpu_mem (default auto)")
    ap.add_argument("--competing-load", action="store_true",
                    help="also run every repeat with a CPU-bound process on --busy-core; report each side's slowdown")
    ap.add_argument("--busy-core", type=int, default=max(os.sched_getaffinity(0)),
                    help="the core the competing load is pinned to (default: the last one)")
    ap.add_argument("--llama-bufts", choices=BUFTS, default="auto",
                    help="llama.cpp's weight buffer types: default (AMX, repacking), no-amx, none (no extra buffer "
                         "types); auto (default): default unless a probe run crashes in AMX (this VM), then no-amx")
    ap.add_argument("--no-engine", action="store_true", help="measure llama.cpp only")
    ap.add_argument("--one", choices=["llama", "engine"], help=argparse.SUPPRESS)   # --mode memcg's child runs
    add_record_flag(ap)
    return ap


TITLES = {"decode": "decode tok/s all in RAM: llama.cpp (llama-cpp-python) vs moe-engine, same checkpoint",
          "prefill": "prefill tok/s all in RAM: llama.cpp (llama-cpp-python) vs moe-engine, same checkpoint",
          "memcg": "decode tok/s under a memory limit, cold cache: llama.cpp mmap vs moe-engine gpu_mem=auto"}


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.n_prompt is None:
        args.n_prompt = [16, 512] if args.mode == "prefill" else [16]
    bad = check_args(args)
    if bad:
        ap.error(bad)
    if args.one:
        return one(args)
    if args.mode == "memcg":
        args.mem_limits = args.mem_limits or [0.4, 0.6]
    if not os.path.isdir(args.engine_model) and not (args.no_engine and args.model):
        raise SystemExit(f"--engine-model {args.engine_model} is not a directory; pass the safetensors checkpoint "
                         f"(the GGUFs are made from it), or --no-engine with --model GGUF to measure llama.cpp alone")
    if args.competing_load:
        args.title_note = f" (and with a competing CPU load on core {args.busy_core})"
    title = TITLES[args.mode] + getattr(args, "title_note", "")
    why, ggufs = unavailable(args)
    if why:
        print(f"llama.cpp not measured: {why}", file=sys.stderr)
        if wants_record(args):
            record(title, "| llama.cpp | moe-engine |\n|---|---|\n| not measured | not measured |",
                   None, f"llama.cpp could not be measured on this machine: {why}.")
        return 1
    if args.mode == "memcg":
        if args.allowance is None:
            from bench_offload import RUNTIME_ALLOWANCE
            args.allowance = RUNTIME_ALLOWANCE
        rows, text = run_memcg(args, ggufs)
        compare = compare_memcg(rows)
    else:
        rows, text = run_in_process(args, ggufs)
        compare = compare_in_process(rows, args.mode)
    print(text)
    print(compare)
    if wants_record(args):
        import torch
        torch.set_num_threads(args.threads[0])   # the Machine line names one count; each row says its own
        record(title, text, compare, notes(args, ggufs, rows))
    return 0


def notes(args, ggufs, rows) -> str:
    import llama_cpp
    files = ", ".join(f"{p}: {g} ({os.path.getsize(g) / 1e9:.2f} GB)" for p, g in ggufs.items())
    out = (f"moe-engine on {args.engine_model}; llama.cpp via llama-cpp-python {llama_cpp.__version__} on {files}. "
           f"Random prompt (seed {args.seed}), greedy, median of {args.repeats} runs, sides interleaved run by run, "
           f"both with the row's thread count. ")
    if args.mode == "decode":
        out += (f"{args.n_decode} timed decode steps. % of bound = tok/s x weight bytes per token / read bandwidth "
                f"(torch.sum over 512 MiB, measured per thread count in this run). ")
    elif args.mode == "prefill":
        out += "Timed: the prefill and the first greedy sample. "
    else:
        out += (f"Each run its own process under in_memcg.sh, its files evicted first; limit = fraction x GGUF size "
                f"+ {args.allowance / 2**20:.0f} MiB; engine gpu_mem={args.engine_gpu_mem}; {args.n_decode} decode "
                f"steps after {args.warmup_decode} warm-up steps. ")
    if args.competing_load:
        out += (f"Competing load: numpy 128x128 matmuls on one BLAS thread pinned to core {args.busy_core}, running "
                f"during the loaded half of each repeat. ")
    used = sorted({f"{r['precision']}: {x['llama_bufts']}" for r in rows
                   for x in (r["llama"] if isinstance(r["llama"], list) else [r["llama"]]) if "llama_bufts" in x})
    out += f"llama.cpp buffer types (--llama-bufts): {', '.join(used)}. "
    if args.mode != "memcg" and rows:
        out += f"llama.cpp system info: {rows[0]['llama']['system_info']}"
    return out


if __name__ == "__main__":
    sys.exit(main())
