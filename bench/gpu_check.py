"""The measuring half of bench/gpu_check.sh (issue 19): one subcommand per check, each appending rows to a TSV file.

    python bench/gpu_check.py probe  --rows ROWS            GPU, torch, triton; prints has_gpu=0|1 and triton=0|1
    python bench/gpu_check.py ext    --rows ROWS --build-rc RC --build-s S --log BUILD_LOG
                                                              did moe_engine._C build, with its CUDA parts?
    python bench/gpu_check.py h2d    --rows ROWS [--mib 64 --reps 10]
                                                              pinned host -> device GB/s: _ops.copy_h2d_async (our
                                                              expert-load path) vs plain torch pinned copies
    python bench/gpu_check.py triton --rows ROWS            qlinear_triton vs its torch twin qlinear_reference
    python bench/gpu_check.py decode --rows ROWS --model DIR [--fraction 0.25 --tokens 64]
                                                              engine decode tokens/s, all experts in GPU memory and
                                                              with a fraction of them cached (--gpu-mem from
                                                              bench_offload.fraction_budget)

A row is `what<TAB>result<TAB>notes`, written (and flushed) as soon as it is known, so a step killed by its
timeout keeps the rows it finished; gpu_check.sh turns the file into the markdown table. Without a CUDA device
every subcommand writes `skip` rows and exits 0. `--device cpu` on triton / decode is a developer's dry run
of the code path (triton then needs TRITON_INTERPRET=1 and runs small shapes).

Loaded as a pytest plugin (`python -m pytest -p gpu_check`, bench/ on PYTHONPATH) this module deselects every
test that is not a CUDA test: the suite has no `cuda` marker; CUDA-only tests are gated by
`pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")` or
`skipif(not _ops.HAS_CUDA_OPS, reason="no CUDA ops in _C")`, and several have no "cuda" in their names, so
`-k cuda` would miss them. Selected: a skipif whose reason names CUDA, a `cuda` / `gpu` marker, or "cuda" in
the test's name. Nothing in tests/, conftest.py or pyproject.toml is touched.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ pytest plugin

def _is_cuda_test(item) -> bool:
    if item.get_closest_marker("cuda") is not None or item.get_closest_marker("gpu") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if reason.startswith("moe_engine._C not loaded"):     # needs_c: its reason quotes the import error
            continue
        if re.search(r"cuda", reason, re.I) or any(isinstance(a, str) and "cuda" in a.lower() for a in mark.args):
            return True
    return "cuda" in item.name.lower()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (selected by bench/gpu_check.py)")
    config.addinivalue_line("markers", "gpu: needs a GPU (selected by bench/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if _is_cuda_test(it)]
    drop = [it for it in items if not _is_cuda_test(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ------------------------------------------------------------------------------------------------ rows

class Rows:
    def __init__(self, path: str):
        self.path = path

    def add(self, what: str, result: str, notes: str = "") -> None:
        clean = [re.sub(r"\s+", " ", str(s)).replace("|", "/").strip() for s in (what, result, notes)]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\t".join(clean) + "\n")
        print(" | ".join(clean), file=sys.stderr, flush=True)


def _cuda_ok() -> tuple[bool, str]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return False, f"torch did not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none"
    return True, ""


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / 1e9 / (ms / 1e3)


# ------------------------------------------------------------------------------------------------ probe

def cmd_probe(args, rows: Rows) -> int:
    has_gpu, triton_ok = False, False
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            has_gpu = True
            rows.add("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                     f"cc {p.major}.{p.minor}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
                     f"python {sys.version.split()[0]}; {args.smi}")
        else:
            rows.add("GPU", "none", f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA "
                     f"device; nvidia-smi: {args.smi or 'absent'}; every GPU row below is skipped")
    except Exception as e:  # noqa: BLE001
        rows.add("GPU", "fail", f"torch did not import: {_err(e)}")
    try:
        import triton
        triton_ok = True
        version = triton.__version__
    except Exception as e:  # noqa: BLE001
        version = f"absent ({_err(e)})"
    print(f"has_gpu={int(has_gpu)}")
    print(f"triton={int(triton_ok)}")
    print(f"triton_version={version}")
    return 0


# ------------------------------------------------------------------------------------------------ ext

def cmd_ext(args, rows: Rows) -> int:
    warn = ""
    if args.log and Path(args.log).is_file():
        lines = [ln.strip() for ln in Path(args.log).read_text(errors="replace").splitlines() if "WARNING" in ln]
        warn = "; ".join(lines[:2])
    try:
        from moe_engine import _ops
    except Exception as e:  # noqa: BLE001
        rows.add("build moe_engine._C", "fail", f"moe_engine._ops did not import: {_err(e)}")
        return 0
    took = f"setup.py build_ext --inplace rc {args.build_rc} in {args.build_s} s"
    if args.build_rc in (124, 137):
        took = f"setup.py build_ext timed out after {args.build_s} s"
    if args.build_rc != 0 and _ops.HAS_C_EXT:       # what imports is an older build, not this one
        rows.add("build moe_engine._C", "fail", f"{took}; an OLDER moe_engine._C imports (has_cuda="
                 f"{bool(_ops._C.has_cuda())}), so the rows below test that one. {warn}")
        return 0
    if not _ops.HAS_C_EXT:
        rows.add("build moe_engine._C", "fail", f"{took}; the extension does not import ({_ops.C_EXT_ERROR}); every "
                 f"op runs its torch twin and the C-only tests skip. {warn}")
        return 0
    has_cuda = bool(_ops._C.has_cuda())
    if has_cuda:
        visible = _ops.HAS_CUDA_OPS
        rows.add("build moe_engine._C", "pass", f"{took}; built WITH its CUDA parts (pinned buffers, copy_h2d_async, "
                 f"events){'' if visible else ' but _C sees no CUDA device'}")
    else:
        rows.add("build moe_engine._C", "pass (no CUDA)",
                 f"{took}; built WITHOUT its CUDA parts: setup.py found no CUDA toolkit (nvcc / cuda_runtime.h / "
                 f"cudart under CUDA_HOME, CUDA_PATH or /usr/local/cuda) or MOE_ENGINE_NO_CUDA=1, so copy_h2d_async "
                 f"and pinned buffers use the torch fallback and the h2d row measures that. {warn}")
    return 0


# ------------------------------------------------------------------------------------------------ h2d

def _time_copies(copy, stream, reps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `reps` copies, timed by CUDA events on `stream`."""
    import torch
    for _ in range(warmup):
        copy()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(stream)
        copy()
        e.record(stream)
        e.synchronize()
        times.append(s.elapsed_time(e))
    return times


def _rate_note(n: int, times: list[float]) -> tuple[float, str]:
    peak = _gbps(n, min(times))
    med = _gbps(n, sorted(times)[len(times) // 2])
    return peak, f"peak {peak:.1f} GB/s, median {med:.1f} GB/s over {len(times)} copies"


def cmd_h2d(args, rows: Rows) -> int:
    ok, why = _cuda_ok()
    if not ok:
        for what in ("h2d copy_h2d_async (our expert-load path)", "h2d torch pinned .to('cuda', non_blocking)"):
            rows.add(what, "skip", why)
        return 0
    import torch
    from moe_engine import _ops
    n = args.mib << 20
    stream = torch.cuda.Stream()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    results = {}

    # plain torch first: the peak our path is compared against
    try:
        src_t = torch.empty(n, dtype=torch.uint8).pin_memory()
        src_t.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))

        def to_cuda():
            with torch.cuda.stream(stream):
                src_t.to("cuda", non_blocking=True)

        def copy_into():
            with torch.cuda.stream(stream):
                dst.copy_(src_t, non_blocking=True)
        p1, note1 = _rate_note(n, _time_copies(to_cuda, stream, args.reps, 2))
        p2, note2 = _rate_note(n, _time_copies(copy_into, stream, args.reps, 2))
        results["torch"] = max(p1, p2)
        rows.add("h2d torch pinned .to('cuda', non_blocking)", f"{max(p1, p2):.1f} GB/s",
                 f"{args.mib} MiB from pin_memory(); .to: {note1}; dst.copy_(non_blocking): {note2}; CUDA events on "
                 f"a side stream")
    except Exception as e:  # noqa: BLE001
        rows.add("h2d torch pinned .to('cuda', non_blocking)", "fail", _err(e))

    backends = ["auto"] + (["torch"] if _ops.HAS_CUDA_OPS else [])
    for backend in backends:
        label = "c" if backend == "auto" and _ops.HAS_CUDA_OPS else "torch"
        what = f"h2d copy_h2d_async backend={label}" + (" (our expert-load path)" if backend == "auto" else "")
        try:
            src = _ops.alloc_aligned(n, pinned=True, backend="auto")
            src.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
            times = _time_copies(lambda: _ops.copy_h2d_async(src, dst, stream, backend=backend), stream, args.reps, 2)
            same = torch.equal(dst.cpu(), src)
            peak, note = _rate_note(n, times)
            ratio = f"{peak / results['torch']:.2f}x torch's peak" if results.get("torch") else "no torch peak"
            alloc = "cudaHostAlloc from _C" if _ops.HAS_CUDA_OPS else "torch pin_memory (no CUDA parts in _C)"
            rows.add(what, f"{peak:.1f} GB/s" if same else "fail",
                     f"{ratio}; {note}; {args.mib} MiB from alloc_aligned(pinned=True) ({alloc}); bytes "
                     f"{'match' if same else 'DIFFER after the copy'}")
        except Exception as e:  # noqa: BLE001
            rows.add(what, "fail", _err(e))
    return 0


# ------------------------------------------------------------------------------------------------ triton

TRITON_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}     # tests/test_quant_triton.py's
# (bits, tokens, rows, cols, dtype): decode (1 token) at every width, a small batch, an expert-sized matrix
TRITON_CASES = [(4, 1, 4096, 4096, "bfloat16"), (3, 1, 4096, 4096, "bfloat16"), (2, 1, 4096, 4096, "bfloat16"),
                (8, 1, 4096, 4096, "bfloat16"), (4, 16, 4096, 4096, "bfloat16"), (4, 1, 14336, 4096, "float16"),
                (4, 100, 14336, 4096, "float16")]
TRITON_CASES_SMALL = [(4, 1, 64, 128, "float32"), (3, 3, 48, 128, "float32")]
GROUP = 64


def _time_call(fn, reps: int, warmup: int, device: str) -> float:
    """Milliseconds per call (CUDA events on the current stream; perf_counter off-GPU)."""
    import torch
    for _ in range(warmup):
        fn()
    if device != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def _qmatrix(r: int, c: int, bits: int, seed: int, device: str):
    import torch
    from moe_engine.quant.format import QMatrix, pack_planes, quantize_matrix
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(r, c, generator=g, device=device)
    codes, scales, zeros = quantize_matrix(w, bits, GROUP)
    return QMatrix(r, c, bits, GROUP, tuple(pack_planes(codes, bits)), scales, zeros)


def _to(m, device: str):
    from dataclasses import replace
    return replace(m, planes=tuple(p.to(device) for p in m.planes), scales=m.scales.to(device),
                   zeros=m.zeros.to(device))


def cmd_triton(args, rows: Rows) -> int:
    device = args.device
    if device == "cuda":
        ok, why = _cuda_ok()
        if not ok:
            rows.add("triton qlinear vs torch twin", "skip", why)
            return 0
    import torch
    try:
        from moe_engine._ops.qmatrix import qlinear_reference
        from moe_engine.quant.triton_qmatmul import qlinear_triton
    except Exception as e:  # noqa: BLE001
        rows.add("triton qlinear vs torch twin", "fail", f"import failed: {_err(e)}")
        return 0
    cases = TRITON_CASES if device == "cuda" else TRITON_CASES_SMALL
    for i, (bits, n, r, c, dt) in enumerate(cases):
        what = f"triton qlinear b{bits} N={n} {r}x{c} {dt}"
        try:
            dtype = getattr(torch, dt)
            try:
                m = _qmatrix(r, c, bits, seed=i, device=device)
            except Exception:  # noqa: BLE001 - quantize on the CPU, then move
                m = _to(_qmatrix(r, c, bits, seed=i, device="cpu"), device)
            x = torch.randn(n, c, generator=torch.Generator().manual_seed(100 + i)).to(device, dtype)
            t0 = time.perf_counter()
            y = qlinear_triton(x, m)
            if device == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            twin_note = ""
            try:
                ref = qlinear_reference(x, m)
                t_ref = _time_call(lambda: qlinear_reference(x, m), args.reps, 2, device)
            except Exception as e:  # noqa: BLE001 - the twin itself failed on this device: compare on the CPU
                ref = qlinear_reference(x.cpu(), _to(m, "cpu")).to(device)
                t_ref = None
                twin_note = f"torch twin RAISED on {device} ({_err(e)}); error measured against the twin on the CPU; "
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            t_tri = _time_call(lambda: qlinear_triton(x, m), args.reps, 3, device)
            wbytes = sum(p.nbytes for p in m.planes) + m.scales.nbytes + m.zeros.nbytes
            tol = TRITON_TOL[dt]
            speed = (f"triton {t_tri * 1e3:.1f} us/call ({_gbps(wbytes, t_tri):.0f} GB/s of packed weights), torch twin "
                     + (f"{t_ref * 1e3:.1f} us/call (triton takes {t_tri / t_ref:.2f}x its time)" if t_ref else "n/a"))
            rows.add(what, "pass" if err <= tol and not twin_note else "fail",
                     f"{twin_note}max rel err {err:.2e} (tol {tol:g}); {speed}; first call {first_s:.2f} s "
                     f"(compile or cache); group {GROUP}")
        except Exception as e:  # noqa: BLE001
            rows.add(what, "fail", _err(e))
            traceback.print_exc()
    return 0


# ------------------------------------------------------------------------------------------------ decode

def _fraction_budget(full, frac: float) -> tuple[int, int]:
    try:
        sys.path.insert(0, str(BENCH))
        from bench_offload import fraction_budget
    except Exception:  # noqa: BLE001 - the same formula, should bench_offload not import
        def fraction_budget(full, frac):
            slots = round(full.total_experts * frac)
            return slots, full.device_bytes - full.device_slots * full.slot_bytes + slots * full.slot_bytes
    return fraction_budget(full, frac)


def _full_plan(model: str, device):
    """The plan with every expert resident, as load() would make it for a budget (bench_offload.run_all's way)."""
    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    from moe_engine.runtime.build import non_expert_bytes
    ckpt = Checkpoint(model)
    try:
        dt = ckpt.dtype
        try:
            staging = 0 if ckpt.raw_is_packed(dt) else 2          # load()'s staging buffers at io_threads=2
        except Exception:  # noqa: BLE001
            staging = 0
        return make_plan(ckpt.spec, device, dt, non_expert_bytes(ckpt, dt), None, None, staging_experts=staging)
    finally:
        ckpt.close()


def _decode_run(model: str, device: str, tokens: int, prompt_len: int, **kw) -> dict:
    import torch

    import moe_engine
    t0 = time.perf_counter()
    eng = moe_engine.load(model, device=device, progress=False, **kw)
    load_s = time.perf_counter() - t0
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, eng.spec.vocab_size, (1, prompt_len), generator=g)
        eng.generate(ids, max_new_tokens=8, eos_token_id=[])              # warm-up: kernels, allocator, cache
        t = time.perf_counter()
        out = eng.generate(ids, max_new_tokens=tokens, eos_token_id=[])
        wall = time.perf_counter() - t
        stats = eng.stats()
        plan = eng.plan
        return {"load_s": load_s, "wall_s": wall, "new": int(out.shape[1] - ids.shape[1]), "stats": stats,
                "slots": plan.device_slots if plan else None, "total": plan.total_experts if plan else None}
    finally:
        eng.close()


def _gib(b) -> str:
    return f"{(b or 0) / 2**30:.2f} GiB"


def cmd_decode(args, rows: Rows) -> int:
    device = args.device
    label_all = "decode tok/s, all experts in GPU memory"
    label_part = f"decode tok/s, {args.fraction:g} of experts cached (gpu_mem budget)"
    if device == "cuda":
        ok, why = _cuda_ok()
        if not ok:
            rows.add(label_all, "skip", why)
            rows.add(label_part, "skip", why)
            return 0
    import torch
    model = args.model
    common = f"model {model}; prompt {args.prompt_len} ids, {args.tokens} new tokens greedy, after an 8-token warm-up"
    base = None
    try:
        r = _decode_run(model, device, args.tokens, args.prompt_len)
        lat, mem = r["stats"]["latency"], r["stats"].get("memory", {})
        base = lat["decode_tokens_per_s"]
        rows.add(label_all, f"{base:.1f} tok/s",
                 f"{common}; {r['new']} tokens in {r['wall_s']:.2f} s wall (prefill {lat.get('prefill_tokens_per_s', 0):.0f}"
                 f" tok/s, ttft {lat.get('ttft_s') or 0:.3f} s); device peak {_gib(mem.get('device_peak_bytes'))}; "
                 f"load {r['load_s']:.1f} s")
    except Exception as e:  # noqa: BLE001
        rows.add(label_all, "fail", f"{common}; {_err(e)}")
        traceback.print_exc()
    try:
        full = _full_plan(model, torch.device(device))
        slots, gpu_mem = _fraction_budget(full, args.fraction)
        r = _decode_run(model, device, args.tokens, args.prompt_len, gpu_mem=gpu_mem)
        st = r["stats"]
        lat, cache, io = st["latency"], st.get("cache", {}), st.get("io", {})
        tps = lat["decode_tokens_per_s"]
        vs = f"; {tps / base:.2f}x the all-resident rate" if base else ""
        rows.add(label_part, f"{tps:.1f} tok/s",
                 f"{common}; gpu_mem={gpu_mem} B ({_gib(gpu_mem)}) for {slots} of {full.total_experts} experts "
                 f"(bench_offload.fraction_budget), the engine's plan holds {r['slots']} slots{vs}; hit rate "
                 f"{cache.get('hit_rate', 0):.2f}, loads {io.get('loads')}, host->device "
                 f"{_gib(io.get('bytes_host_to_device'))}, stall {io.get('stall_seconds', 0):.2f} s; "
                 f"{r['new']} tokens in {r['wall_s']:.2f} s wall; load {r['load_s']:.1f} s")
    except Exception as e:  # noqa: BLE001
        rows.add(label_part, "fail", f"{common}; {_err(e)}")
        traceback.print_exc()
    return 0


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "ext", "h2d", "triton", "decode"):
        s = sub.add_parser(name)
        s.add_argument("--rows", required=True, help="TSV file the rows are appended to")
        if name == "probe":
            s.add_argument("--smi", default="", help="nvidia-smi's one-line answer, for the notes")
        if name == "ext":
            s.add_argument("--build-rc", type=int, default=0)
            s.add_argument("--build-s", type=int, default=0)
            s.add_argument("--log", default="")
        if name == "h2d":
            s.add_argument("--mib", type=int, default=64)
            s.add_argument("--reps", type=int, default=10)
        if name == "triton":
            s.add_argument("--reps", type=int, default=20)
            s.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
        if name == "decode":
            s.add_argument("--model", required=True)
            s.add_argument("--fraction", type=float, default=0.25)
            s.add_argument("--tokens", type=int, default=64)
            s.add_argument("--prompt-len", type=int, default=32)
            s.add_argument("--device", default="cuda", help="cpu: a dry run of the code path")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = Rows(args.rows)
    cmd = {"probe": cmd_probe, "ext": cmd_ext, "h2d": cmd_h2d, "triton": cmd_triton, "decode": cmd_decode}[args.cmd]
    return cmd(args, rows)


if __name__ == "__main__":
    sys.exit(main())
