"""GGUF files of a safetensors checkpoint for the llama.cpp comparison (bench_llamacpp.py), made and cached.

    python bench/llamacpp_gguf.py /work/bench_data/mixtral-1.4g                       # bf16, q8_0, q4_0 (the defaults)
    python bench/llamacpp_gguf.py MODEL_DIR --variants bf16 q8_0-experts q4_0-experts [--gguf-dir DIR] [--converter PATH]

Variants (one file each, MODEL_DIR/../NAME-VARIANT.gguf, or under --gguf-dir):

  bf16           llama.cpp's converter (convert_hf_to_gguf.py --outtype bf16) on the checkpoint, with the made-up
                 32000-token Llama tokenizer of bench/llama_tokenizer.py (the converter needs a tokenizer; the
                 checkpoint must have vocab_size 32000, e.g. make_checkpoint.py --vocab 32000 --no-tokenizer)
  q8_0, q4_0     llama_cpp.llama_model_quantize of the bf16 file, LLAMA_FTYPE_MOSTLY_Q8_0 / Q4_0: llama-quantize's
                 standard mix (every 2-D weight quantized; its rules may raise a few tensors, e.g. output.weight,
                 to a wider type)
  q8_0-experts,  only the experts quantized (pure Q8_0 / Q4_0), every dense weight kept bf16, as the engine's
  q4_0-experts   quant="int8" / "int4" does: llama_model_quantize_params.pure plus token_embedding_type and
                 output_tensor_type = GGML_TYPE_BF16 and a tensor-type override (tt_overrides) "attn_" -> BF16
                 (norms and the router, ffn_gate_inp, are never quantized by llama.cpp)

Each GGUF has a sidecar NAME.gguf.key.json holding the checkpoint's key (size and mtime of its config.json and
*.safetensors files) and the variant; a GGUF whose key differs is stale and rebuilt. A GGUF with no sidecar
(made by hand) is adopted when it is newer than every checkpoint file and has the checkpoint's layer count and
hidden size. Files are written to NAME.gguf.tmp and renamed when complete.

The converter is looked up in --converter, then $LLAMA_CPP_CONVERTER, then the llama-cpp-python 0.3.36 sdist
unpacked at /tmp/x (CONVERTER_DEFAULT). It is not in the wheel; get it with
  pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/x && tar xzf /tmp/x/llama_cpp_python-0.3.36.tar.gz -C /tmp/x
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CONVERTER_DEFAULT = "/tmp/x/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"
GET_CONVERTER = ("pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/x && "
                 "tar xzf /tmp/x/llama_cpp_python-0.3.36.tar.gz -C /tmp/x")
VOCAB = 32000                       # bench/llama_tokenizer.py's vocabulary
GGML_TYPE_BF16 = 30                 # ggml.h; llama-cpp-python 0.3.36 does not export it
RECIPE = 1                          # bump when a variant's recipe changes: every cached GGUF is then stale
# variant -> (llama_ftype constant name, experts only) ; bf16 is the converter's output
VARIANTS = {"bf16": None, "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", False), "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", False),
            "q8_0-experts": ("LLAMA_FTYPE_MOSTLY_Q8_0", True), "q4_0-experts": ("LLAMA_FTYPE_MOSTLY_Q4_0", True)}


def log(msg: str) -> None:
    print(f"[gguf] {msg}", file=sys.stderr, flush=True)


# ---- cache keys ---------------------------------------------------------------------------------
def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files a GGUF is made from: config.json and every *.safetensors (the index too, when sharded)."""
    d = Path(model_dir)
    files = sorted([*d.glob("*.safetensors"), *d.glob("*.safetensors.index.json"), d / "config.json"])
    missing = [f.name for f in files if not f.is_file()]
    if missing or not any(f.suffix == ".safetensors" for f in files):
        raise FileNotFoundError(f"{d} is not a safetensors checkpoint (needs config.json and *.safetensors; "
                                f"missing {missing or '*.safetensors'})")
    return files


def checkpoint_key(model_dir: str | os.PathLike) -> dict:
    """{file name: [size, mtime_ns]} of the checkpoint's files: any rewrite of the checkpoint changes it."""
    out = {}
    for f in checkpoint_files(model_dir):
        st = f.stat()
        out[f.name] = [st.st_size, st.st_mtime_ns]
    return out


def gguf_path(model_dir: str | os.PathLike, variant: str, gguf_dir: str | os.PathLike | None = None) -> Path:
    """Where the variant's GGUF lives: beside the checkpoint directory, or under gguf_dir."""
    check_variant(variant)
    d = Path(model_dir).resolve()
    return Path(gguf_dir or d.parent) / f"{d.name}-{variant}.gguf"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".key.json")


def wanted(model_dir, variant: str) -> dict:
    return {"checkpoint": str(Path(model_dir).resolve()), "variant": variant, "recipe": RECIPE,
            "files": checkpoint_key(model_dir)}


def freshness(path: Path, model_dir, variant: str) -> str:
    """'fresh', 'adopt' (no sidecar, but newer than the checkpoint), 'missing' or 'stale: why'."""
    if not path.is_file():
        return "missing"
    want = wanted(model_dir, variant)
    side = sidecar(path)
    if side.is_file():
        try:
            have = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            return f"stale: unreadable {side.name} ({e})"
        for k in ("variant", "recipe"):
            if have.get(k) != want[k]:
                return f"stale: {k} changed ({have.get(k)!r} -> {want[k]!r})"
        old = have.get("files") or {}
        changed = sorted(n for n in {*old, *want["files"]} if old.get(n) != want["files"].get(n))
        if changed:
            return f"stale: files changed since it was made ({', '.join(changed)}: size or mtime)"
        return "fresh"
    newest = max(v[1] for v in want["files"].values())
    if path.stat().st_mtime_ns < newest:
        return "stale: no key file and older than the checkpoint"
    return "adopt"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown GGUF variant {variant!r}; choose from {', '.join(VARIANTS)}")


# ---- making -------------------------------------------------------------------------------------
def find_converter(flag: str | None = None) -> Path:
    """--converter, $LLAMA_CPP_CONVERTER, or the sdist under /tmp/x; a missing one raises with how to get it."""
    cand = flag or os.environ.get(CONVERTER_ENV) or CONVERTER_DEFAULT
    if not Path(cand).is_file():
        raise FileNotFoundError(f"llama.cpp's convert_hf_to_gguf.py not found at {cand}; get it with `{GET_CONVERTER}` "
                                f"(or pass --converter / set ${CONVERTER_ENV})")
    return Path(cand)


def matches_checkpoint(path: Path, model_dir) -> bool:
    """A GGUF made elsewhere has the checkpoint's layer count, hidden size and tensor types we expect."""
    from gguf import GGUFReader
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    fields = GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents()
    return (fields[f"{arch}.block_count"].contents() == cfg.get("num_hidden_layers")
            and fields[f"{arch}.embedding_length"].contents() == cfg.get("hidden_size"))


class _Progress:
    """Prints the size of a file being written every few seconds (a converter or quantizer's output)."""

    def __init__(self, path: Path, what: str, every: float = 10.0):
        self.path, self.what, self.every, self.stop = path, what, every, threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            size = self.path.stat().st_size if self.path.exists() else 0
            log(f"  {self.what}: {size / 1e9:.2f} GB written, {time.perf_counter() - self.t0:.0f} s")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def convert_bf16(model_dir, out: Path, converter: Path) -> None:
    """checkpoint -> bf16 GGUF with llama.cpp's converter, through a directory of links plus the made-up tokenizer."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("vocab_size") != VOCAB:
        raise ValueError(f"{model_dir}: vocab_size {cfg.get('vocab_size')}; the GGUF uses bench/llama_tokenizer.py's "
                         f"{VOCAB}-token vocabulary (make the checkpoint with make_checkpoint.py --vocab {VOCAB})")
    tmp = out.with_name(out.name + ".tmp")
    with tempfile.TemporaryDirectory(prefix="gguf-src-") as src:
        for f in [*checkpoint_files(model_dir), Path(model_dir) / "generation_config.json"]:
            if f.is_file():
                os.symlink(f.resolve(), Path(src) / f.name)
        subprocess.run([sys.executable, str(BENCH / "llama_tokenizer.py"), src], check=True, stdout=sys.stderr)
        cmd = [sys.executable, str(converter), src, "--outtype", "bf16", "--outfile", str(tmp)]
        log("$ " + " ".join(cmd))
        with _Progress(tmp, "bf16"):
            proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {proc.returncode}); its output is above")
    os.replace(tmp, out)


def quantize_params(llama_cpp, variant: str, threads: int | None):
    """llama_model_quantize_params for the variant; returns (params, objects that must outlive the call)."""
    ftype_name, experts_only = VARIANTS[variant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads or 0
    keep = []
    if experts_only:
        bf16 = getattr(llama_cpp, "GGML_TYPE_BF16", GGML_TYPE_BF16)
        params.pure = True                               # experts exactly Q8_0 / Q4_0, no per-tensor upgrades
        params.token_embedding_type = bf16
        params.output_tensor_type = bf16
        Override = llama_cpp.llama_model_tensor_override
        table = (Override * 2)(Override(b"attn_", bf16), Override(None, 0))   # NULL pattern ends the list
        params.tt_overrides = table
        keep.append(table)
    return params, keep


def quantize(src: Path, out: Path, variant: str, threads: int | None = None) -> None:
    import ctypes

    import llama_cpp
    params, keep = quantize_params(llama_cpp, variant, threads)
    tmp = out.with_name(out.name + ".tmp")
    log(f"llama_model_quantize {src.name} -> {out.name} ({VARIANTS[variant][0]}"
        f"{', experts only, dense weights bf16' if VARIANTS[variant][1] else ''})")
    with _Progress(tmp, variant):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src}, {variant}) returned {rc}")
    os.replace(tmp, out)


def ensure_gguf(model_dir, variant: str, gguf_dir=None, converter: str | None = None, threads: int | None = None,
                rebuild: bool = False) -> Path:
    """The variant's GGUF for the checkpoint, made (and its bf16 parent first) when missing or stale."""
    check_variant(variant)
    path = gguf_path(model_dir, variant, gguf_dir)
    state = "rebuild asked" if rebuild else freshness(path, model_dir, variant)
    if state == "adopt":
        if matches_checkpoint(path, model_dir):
            log(f"{path}: no key file, newer than the checkpoint and of its shape: adopted")
            sidecar(path).write_text(json.dumps(wanted(model_dir, variant), indent=1))
            return path
        state = "stale: no key file and not of the checkpoint's shape"
    if state == "fresh":
        log(f"{path}: up to date")
        return path
    log(f"{path}: {state}; making it")
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sidecar(path).unlink(missing_ok=True)
    if variant == "bf16":
        convert_bf16(model_dir, path, find_converter(converter))
    else:
        src = ensure_gguf(model_dir, "bf16", gguf_dir, converter, threads, False)
        quantize(src, path, variant, threads)
    sidecar(path).write_text(json.dumps(wanted(model_dir, variant), indent=1))
    log(f"{path}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return path


# ---- reading ------------------------------------------------------------------------------------
def weights_read_per_token(path: str | os.PathLike) -> int:
    """Bytes of weights one decode token reads from the GGUF: every dense tensor, one row of token_embd, and
    top-k / n_expert of each stacked expert tensor (*_exps). KV-cache reads are not counted."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    used, count = (r.fields[f"{arch}.{k}"].contents() for k in ("expert_used_count", "expert_count"))
    total = 0
    for t in r.tensors:
        if "_exps." in t.name:
            total += t.n_bytes * used // count
        elif t.name == "token_embd.weight":
            total += t.n_bytes // int(t.shape[-1])          # shape is [hidden, vocab]: one row of vocab
        else:
            total += t.n_bytes
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the safetensors checkpoint directory")
    ap.add_argument("--variants", nargs="+", default=["bf16", "q8_0", "q4_0"], choices=list(VARIANTS))
    ap.add_argument("--gguf-dir", help="where the GGUFs go (default: beside the checkpoint directory)")
    ap.add_argument("--converter", help=f"convert_hf_to_gguf.py (default ${CONVERTER_ENV} or {CONVERTER_DEFAULT})")
    ap.add_argument("--threads", type=int, default=None, help="quantization threads (default: all cores)")
    ap.add_argument("--rebuild", action="store_true", help="make the variants again even when up to date")
    args = ap.parse_args(argv)
    try:
        for v in args.variants:
            p = ensure_gguf(args.model, v, args.gguf_dir, args.converter, args.threads, args.rebuild)
            print(p)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
