"""What the integrity checks of issue 21 cost, next to what they guard (README, "What is detected and what is not").

    stat per read        the FileWatch check after every expert read (os.stat of the file: inode, size, mtime, ctime)
    sha256 per GB        re-hashing a checkpoint file for the quantized-cache key when its stamp changed (and what
                         hashing every file at every start would cost instead of remembering the hashes)
    crc32 per GB         verify_entry's per-expert checksums when a quantized entry is opened
    logits check         the per-step sum over the logits (B x V float32) that guards against NaN / inf
    expert read          one expert's bytes read from a file in the page cache, for scale

Usage: python bench/bench_hardening.py [--mib 256] [--vocab 151936] [--batch 8] [--expert-mib 16]
Prints one table; files go to a temporary directory that is removed afterwards.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import add_record_flag, record, wants_record  # noqa: E402


def best(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` runs, seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="bytes to hash, MiB")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--expert-mib", type=int, default=16)
    add_record_flag(ap)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        data = os.urandom(args.mib << 20)
        with open(path, "wb") as f:
            f.write(data)
        n = 20000
        stat = best(lambda: [os.stat(path) for _ in range(n)]) / n
        sha = best(lambda: hashlib.sha256(data).digest(), 3)
        crc = best(lambda: zlib.crc32(data), 3)
        expert = bytearray(args.expert_mib << 20)
        fd = os.open(path, os.O_RDONLY)
        read = best(lambda: os.preadv(fd, [expert], 0))
        os.close(fd)
    logits = torch.randn(args.batch, args.vocab)
    check = best(lambda: bool(torch.isfinite(logits.sum()).all()), 200)
    gb = (args.mib << 20) / 1e9
    rows = [("stat after an expert read", f"{stat * 1e6:.2f} us"),
            (f"read of one {args.expert_mib} MiB expert (page cache)", f"{read * 1e3:.2f} ms"),
            ("sha256", f"{gb / sha:.2f} GB/s ({sha / gb:.2f} s per GB)"),
            ("crc32", f"{gb / crc:.2f} GB/s ({crc / gb:.2f} s per GB)"),
            (f"logits check, {args.batch} x {args.vocab} float32", f"{check * 1e6:.1f} us per step")]
    table = "| check | cost |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table)
    if wants_record(args):
        record("issue 21: what the integrity checks cost", table,
               comparison=f"stat per read / expert read: {stat / read:.1e}",
               notes="Each check next to what it guards (README, What is detected and what is not).")


if __name__ == "__main__":
    main()
