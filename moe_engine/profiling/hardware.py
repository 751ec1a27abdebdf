"""Hardware models for the offloading simulator: one link that brings experts in, one compute device.

A `Hardware` says how fast an expert moves over the link into the compute tier (bytes/s plus a
fixed latency per load) and how fast the compute device runs what a decode token needs. Decode
at batch 1 is a matrix-vector product per weight matrix, bound by memory bandwidth, so compute is
given as the bytes of weights the device streams per second: an expert takes expert_bytes /
`compute_bytes_per_s` (+ `expert_overhead_s`), the non-expert part of a layer (attention, norms,
router) non_expert_bytes / `compute_bytes_per_s` (+ `layer_overhead_s`), and lm_head likewise.
KV-cache reads and attention FLOPs are not modelled (short contexts; they are small at batch 1).

Presets (PRESETS; assumptions stated per entry, all numbers are effective rates, not datasheet peaks):
  pcie4-x16       RTX 4090-class 24 GB card: PCIe 4.0 x16 at 25 GB/s effective (31.5 GB/s raw), GDDR6X
                  1008 GB/s of which 70% reached by GEMV kernels; 10 us per copy; 2 us per expert launch.
  pcie4-x8-8gb    RTX 4060-class 8 GB card: PCIe 4.0 x8 (the 4060's link) at 12.5 GB/s, GDDR6 272 GB/s x 70%.
  pcie5-x16       RTX 5090-class 32 GB card: PCIe 5.0 x16 at 50 GB/s effective, GDDR7 1792 GB/s x 70%.
  this-cpu-disk   this VM (bench/RESULTS.md, issue 4 quiet run): no GPU; experts read from disk with the
                  engine's direct-IO reader at 1.92 GB/s into RAM slots; compute = torch bf16 GEMV on
                  2 threads, 19 GB/s (41.6 tok/s all-in-RAM on the 1.41 GB Mixtral-shaped checkpoint).
  this-cpu-dram   the same CPU with experts in host RAM (page cache) copied into slots at 10 GB/s
                  (one-thread memcpy, an assumption; `measure_dram` measures it).
`measure_disk` / `measure_dram` measure the link on the spot (the engine's own _ops reader for disk).
`host_compute_bytes_per_s` (simulate --host-compute, no preset sets it) models hybrid execution: a miss is
computed by the host CPU from host RAM when that is faster than loading it, as the engine's cost model decides.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _ops
from ..errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    link_bytes_per_s: float                 # expert loads over the link (disk -> RAM, or host -> GPU)
    compute_bytes_per_s: float              # weights streamed per second by decode GEMVs on the compute device
    load_latency_s: float = 0.0             # fixed cost per load (request, DMA setup)
    expert_overhead_s: float = 0.0          # per expert computed (kernel launches / dispatch)
    layer_overhead_s: float = 0.0           # per MoE layer of a token (framework and launch overhead)
    token_overhead_s: float = 0.0           # per token (sampling, embedding, Python)
    overlap: bool = True                    # IO runs while compute runs (async loader); False: loads serialize
    host_compute_bytes_per_s: float | None = None   # hybrid execution: the host CPU computes a miss streaming
                                                    # its weights at this rate when that beats loading it
    memory_bytes: int | None = None         # the compute tier's size, when the preset is a concrete card
    device: str = "cuda"                    # the compute device the engine's placement plan is made for
    notes: str = ""

    def __post_init__(self):
        for field in ("link_bytes_per_s", "compute_bytes_per_s"):
            if not getattr(self, field) > 0:
                raise ConfigError(f"hardware {self.name!r}: {field} must be > 0, got {getattr(self, field)}")
        for field in ("load_latency_s", "expert_overhead_s", "layer_overhead_s", "token_overhead_s"):
            if getattr(self, field) < 0:
                raise ConfigError(f"hardware {self.name!r}: {field} must be >= 0, got {getattr(self, field)}")
        if self.host_compute_bytes_per_s is not None and not self.host_compute_bytes_per_s > 0:
            raise ConfigError(f"hardware {self.name!r}: host_compute_bytes_per_s must be > 0, got "
                              f"{self.host_compute_bytes_per_s}")

    def load_s(self, nbytes: int) -> float:
        """Seconds one load of `nbytes` holds the link."""
        return self.load_latency_s + nbytes / self.link_bytes_per_s

    def expert_s(self, nbytes: int) -> float:
        """Seconds to compute one expert of `nbytes` weights for one token."""
        return self.expert_overhead_s + nbytes / self.compute_bytes_per_s

    def host_expert_s(self, nbytes: int, tokens: int = 1) -> float | None:
        """Seconds for the host CPU to compute one expert of `nbytes` for `tokens` tokens (None: no hybrid)."""
        if self.host_compute_bytes_per_s is None:
            return None
        return self.expert_overhead_s + tokens * nbytes / self.host_compute_bytes_per_s

    def replace(self, **changes) -> Hardware:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Hardware] = {
    "pcie4-x16": Hardware("pcie4-x16", 25 * GB, 0.7 * 1008 * GB, load_latency_s=10e-6, expert_overhead_s=2e-6,
                          layer_overhead_s=20e-6, token_overhead_s=200e-6, memory_bytes=24 << 30,
                          notes="RTX 4090-class 24 GB on PCIe 4.0 x16 (25 GB/s effective H2D from pinned memory); "
                                "GEMV at 70% of 1008 GB/s"),
    "pcie4-x8-8gb": Hardware("pcie4-x8-8gb", 12.5 * GB, 0.7 * 272 * GB, load_latency_s=10e-6,
                             expert_overhead_s=2e-6, layer_overhead_s=20e-6, token_overhead_s=200e-6,
                             memory_bytes=8 << 30,
                             notes="RTX 4060-class 8 GB on PCIe 4.0 x8 (12.5 GB/s effective); GEMV at 70% of 272 GB/s"),
    "pcie5-x16": Hardware("pcie5-x16", 50 * GB, 0.7 * 1792 * GB, load_latency_s=10e-6, expert_overhead_s=2e-6,
                          layer_overhead_s=20e-6, token_overhead_s=200e-6, memory_bytes=32 << 30,
                          notes="RTX 5090-class 32 GB on PCIe 5.0 x16 (50 GB/s effective); GEMV at 70% of 1792 GB/s"),
    "this-cpu-disk": Hardware("this-cpu-disk", 1.92 * GB, 19 * GB, load_latency_s=100e-6,
                              expert_overhead_s=50e-6, layer_overhead_s=300e-6, device="cpu",
                              notes="2-core VM of bench/RESULTS.md: direct-IO 1.92 GB/s, torch bf16 GEMV ~19 GB/s "
                                    "(2 threads); overheads are assumptions of the engine's Python per layer"),
    "this-cpu-dram": Hardware("this-cpu-dram", 10 * GB, 19 * GB, load_latency_s=5e-6, expert_overhead_s=50e-6,
                              layer_overhead_s=300e-6, device="cpu",
                              notes="same CPU, experts in host RAM copied into slots at an assumed 10 GB/s"),
}


def preset(name: str) -> Hardware:
    if name not in PRESETS:
        raise ConfigError(f"--hardware {name!r} is not a preset; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def measure_disk(path: str | Path, nbytes: int = 512 << 20, io_threads: int = 2, chunk: int = 64 << 20) -> float:
    """Direct-IO read bandwidth (bytes/s) of the first `nbytes` of `path` with the engine's own reader."""

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cannot measure disk bandwidth: {path} is not a file (give a large checkpoint file)")
    size = min(path.stat().st_size, nbytes)
    reader, buf = _ops.DirectReader(num_threads=io_threads), _ops.alloc_aligned(chunk)
    try:
        t0 = time.perf_counter()
        for off in range(0, size - size % 4096, chunk):
            n = min(chunk, size - off) // 4096 * 4096
            reader.read([_ops.ReadRange(str(path), off, n, buf)])
        return size / (time.perf_counter() - t0)
    finally:
        reader.close()


def measure_dram(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Host memory copy bandwidth (bytes/s): the best of `repeats` copies of `nbytes` with torch."""
    import torch
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
