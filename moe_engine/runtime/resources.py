"""What this process may use of the machine: memory for `--gpu-mem auto` / `--cpu-mem auto`, cores for threads.

    ResourceProbe(proc_root="/proc", cgroup_root="/sys/fs/cgroup")   the files the kernel states limits in
        .host_memory() -> HostMemory     the cgroup's memory limit minus what the cgroup uses (v2: memory.max and
                                          memory.high, memory.current; v1: memory.limit_in_bytes,
                                          memory.usage_in_bytes), at this process's cgroup and every parent, and
                                          MemAvailable of /proc/meminfo: the smaller is what is available; plus
                                          this process's RSS (its runtime footprint)
        .cpu_limit() -> CpuLimit         cores in os.sched_getaffinity(0) and the cgroup CPU quota (v2 cpu.max
                                          "QUOTA PERIOD", v1 cpu.cfs_quota_us / cpu.cfs_period_us)
    auto_budgets(offload, device, probe) -> Budgets   "auto" budgets -> bytes, with the sentence saying how
    apply_threads(threads, probe) -> str              torch's compute threads, and why that many

Memory. The cgroup's usage counts its page cache; the inactive file pages (memory.stat inactive_file,
reclaimed before the kernel would kill anything) are not counted as used, the active ones are. The engine's
expert reads use O_DIRECT and add no page cache, but reading the non-expert weights and the tokenizer does.
What "auto" gives the compute tier = what is available now - a safety margin (MARGIN_MIN or MARGIN_FRACTION
of it, the larger). The process's RSS when the plan is made (python, torch, transformers, the tokenizer:
the runtime's footprint) is already part of the cgroup's usage and missing from MemAvailable, so it is
stated, not subtracted twice; the plan then takes the non-expert weights, the KV reserve, the IO buffers and
the activation workspace out of the budget (experts/plan.py) and gives the experts the rest. On a GPU,
`--gpu-mem auto` is the free device memory (torch.cuda.mem_get_info) minus GPU_MARGIN_MIN or
MARGIN_FRACTION, and `--cpu-mem auto` the host figure above.

Threads. The compute threads (torch's intra-op pool, which the C kernels use through torch.get_num_threads())
are the cores this process may use: the affinity mask, capped by floor(quota / period) of the cgroup's CPU
quota (at least 1) and by torch's own default (physical cores). They are set at build unless the caller chose:
`threads=` / `--threads`, OMP_NUM_THREADS in the environment, or torch.set_num_threads called before load().

The roots are arguments so that tests read fake cgroup and /proc files.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..config import format_size
from ..errors import ConfigError

AUTO = "auto"
MARGIN_MIN = 64 << 20            # host safety margin: at least 64 MiB ...
MARGIN_FRACTION = 0.05           # ... or 5% of what is available, the larger
GPU_MARGIN_MIN = 256 << 20       # device margin: CUDA context growth, cuBLAS workspaces, allocator rounding
UNLIMITED = 1 << 60              # cgroup v1 states "no limit" as a huge number (9223372036854771712)
THREADS_ENV = "OMP_NUM_THREADS"

_TORCH_DEFAULT_THREADS = torch.get_num_threads()     # before anything here changes it
_threads_set: list[int] = []                          # [the count apply_threads last set]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    """A counter of a cgroup's memory.stat ("inactive_file 123"), 0 when absent."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value) or 0
    return 0


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit of this process's cgroup and its parents."""

    version: int                 # 1 or 2
    path: str                    # the cgroup directory that states it
    limit: int                   # bytes
    usage: int                   # bytes the whole cgroup uses (page cache included)
    reclaimable: int = 0         # inactive page cache within `usage`

    @property
    def in_use(self) -> int:
        return max(0, self.usage - self.reclaimable)

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.in_use)


@dataclass(frozen=True)
class HostMemory:
    cgroup: CgroupMemory | None  # None: no cgroup limits this process
    mem_available: int | None    # /proc/meminfo MemAvailable
    rss: int                     # this process's resident bytes when measured: the runtime's footprint

    @property
    def available(self) -> int | None:
        figures = [f for f in (self.cgroup and self.cgroup.headroom, self.mem_available) if f is not None]
        return min(figures) if figures else None

    def describe(self) -> str:
        """'cgroup v2 limit 1.30 GiB, 210 MiB in use, MemAvailable 20.1 GiB -> 1.09 GiB available'"""
        cg = self.cgroup
        parts = ["no cgroup memory limit" if cg is None else
                 f"cgroup v{cg.version} limit {format_size(cg.limit)}, {format_size(cg.in_use)} in use"
                 + (f" (+ {format_size(cg.reclaimable)} reclaimable page cache)" if cg.reclaimable else "")]
        parts.append("MemAvailable unknown" if self.mem_available is None
                     else f"MemAvailable {format_size(self.mem_available)}")
        avail = self.available
        return ", ".join(parts) + (f" -> {format_size(avail)} available" if avail is not None else "")


@dataclass(frozen=True)
class CpuLimit:
    affinity: int                # cores in this process's affinity mask
    quota: float | None          # CPUs the cgroup's quota allows (quota / period); None: no quota
    quota_source: str = ""       # "cgroup v2 cpu.max 150000 100000"

    @property
    def cores(self) -> int:
        """The cores this process may keep busy: the affinity, capped by floor(quota), at least 1."""
        n = self.affinity if self.quota is None else min(self.affinity, math.floor(self.quota))
        return max(1, n)

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else \
            f"{self.quota_source} = {self.quota:g} CPU{'' if self.quota == 1 else 's'}"
        return f"{self.affinity} cores in the CPU affinity, {quota}"


class ResourceProbe:
    """Reads the limits this process runs under. proc_root / cgroup_root: where /proc and the cgroup file
    systems are (tests: fake trees in a temporary directory); rss / affinity: fixed figures instead of
    measuring this process (tests)."""

    def __init__(self, proc_root: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup",
                 rss: int | None = None, affinity: int | None = None):
        self.proc, self.cgroup_root = Path(proc_root), Path(cgroup_root)
        self._rss, self._affinity = rss, affinity

    # ---- where this process's cgroups are ---------------------------------------------------------------
    def _memberships(self) -> list[tuple[str, list[str], str]]:
        """/proc/self/cgroup -> (hierarchy id, controllers, path) per line."""
        out = []
        for line in (_read(self.proc / "self" / "cgroup") or "").splitlines():
            hid, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            out.append((hid, [c for c in controllers.split(",") if c], path or "/"))
        return out

    def _levels(self, mount: Path, path: str) -> list[Path]:
        """The cgroup's directory under `mount` and each parent up to the mount's root, those that exist (a
        path from another cgroup namespace is not visible inside a container; its root still is)."""
        parts = [p for p in path.split("/") if p]
        dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
        return [d for d in dirs if d.is_dir()]

    def _v2_mount(self) -> Path | None:
        for mount in (self.cgroup_root, self.cgroup_root / "unified"):      # unified, or hybrid's v2 part
            if (mount / "cgroup.controllers").is_file():
                return mount
        return None

    def _v2_dirs(self) -> list[Path]:
        mount = self._v2_mount()
        paths = [p for hid, ctl, p in self._memberships() if hid == "0" and not ctl]
        return self._levels(mount, paths[0]) if mount is not None and paths else []

    def _v1_dirs(self, controller: str) -> list[Path]:
        for _, ctl, path in self._memberships():
            if controller in ctl:
                for name in (controller, ",".join(ctl), ",".join(sorted(ctl))):
                    if (self.cgroup_root / name).is_dir():
                        return self._levels(self.cgroup_root / name, path)
        return []

    # ---- memory -------------------------------------------------------------------------------------------
    def cgroup_memory(self) -> CgroupMemory | None:
        """The limit with the least headroom over this process's cgroup and its parents, v2 and v1."""
        found = []
        for d in self._v2_dirs():
            limits = [_int(_read(d / f)) for f in ("memory.max", "memory.high")]   # "max": no limit -> None
            limits = [x for x in limits if x is not None]
            usage = _int(_read(d / "memory.current"))
            if limits and usage is not None:
                found.append(CgroupMemory(2, str(d), min(limits), usage, _stat(d / "memory.stat", "inactive_file")))
        for d in self._v1_dirs("memory"):
            limit, usage = _int(_read(d / "memory.limit_in_bytes")), _int(_read(d / "memory.usage_in_bytes"))
            if limit is not None and limit < UNLIMITED and usage is not None:
                stat = d / "memory.stat"
                reclaim = _stat(stat, "total_inactive_file") or _stat(stat, "inactive_file")
                found.append(CgroupMemory(1, str(d), limit, usage, reclaim))
        return min(found, key=lambda c: c.headroom) if found else None

    def mem_available(self) -> int | None:
        for line in (_read(self.proc / "meminfo") or "").splitlines():
            if line.startswith("MemAvailable:"):
                fields = line.split()
                n = _int(fields[1]) if len(fields) > 1 else None
                return None if n is None else n * (1024 if fields[-1].lower() == "kb" else 1)
        return None

    def rss(self) -> int:
        return self._rss if self._rss is not None else psutil.Process().memory_info().rss

    def host_memory(self) -> HostMemory:
        return HostMemory(self.cgroup_memory(), self.mem_available(), self.rss())

    # ---- cores --------------------------------------------------------------------------------------------
    def affinity(self) -> int:
        if self._affinity is not None:
            return self._affinity
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):          # not on Linux
            return os.cpu_count() or 1

    def cpu_quota(self) -> tuple[float, str] | None:
        """(CPUs, where it is stated) of the tightest CPU quota over the cgroup and its parents; None: none."""
        found = []
        for d in self._v2_dirs():
            fields = (_read(d / "cpu.max") or "").split()
            quota, period = (_int(fields[0]), _int(fields[1])) if len(fields) == 2 else (None, None)
            if quota is not None and quota > 0 and period:
                found.append((quota / period, f"cgroup v2 cpu.max {quota} {period}"))
        for d in self._v1_dirs("cpu"):
            quota, period = _int(_read(d / "cpu.cfs_quota_us")), _int(_read(d / "cpu.cfs_period_us"))
            if quota is not None and quota > 0 and period:
                found.append((quota / period, f"cgroup v1 cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period}"))
        return min(found) if found else None

    def cpu_limit(self) -> CpuLimit:
        quota = self.cpu_quota()
        return CpuLimit(self.affinity(), *(quota if quota else (None, "")))


# ---- budgets ----------------------------------------------------------------------------------------------

def margin(available: int, minimum: int = MARGIN_MIN) -> int:
    return max(minimum, int(available * MARGIN_FRACTION))


@dataclass(frozen=True)
class AutoBudget:
    flag: str                    # "--gpu-mem" / "--cpu-mem"
    nbytes: int                  # the budget chosen (0 when nothing is left)
    found: str                   # what was read, ending in "-> N available"
    margin: int

    def describe(self) -> str:
        return f"{self.flag} auto: {self.found}; margin {format_size(self.margin)} -> {format_size(self.nbytes)}"


@dataclass(frozen=True)
class Budgets:
    """The budgets in bytes ("auto" resolved) and what the plan says about memory."""

    gpu_mem: int | None
    cpu_mem: int | None
    device_auto: AutoBudget | None = None
    host_auto: AutoBudget | None = None
    notes: tuple[str, ...] = ()
    runtime_rss: int | None = None   # this process's RSS when measured (the plan's runtime footprint)

    def apply(self, offload):
        """`offload` (runtime/config.OffloadConfig) with these budgets in bytes."""
        gpu_mem = self.gpu_mem if self.device_auto is None else max(1, self.gpu_mem)   # 0 left: the plan says
        return dataclasses.replace(offload, gpu_mem=gpu_mem, cpu_mem=self.cpu_mem)     # what it would need


def _host_auto(flag: str, host: HostMemory) -> AutoBudget:
    avail = host.available
    if avail is None:
        raise ConfigError(f"{flag} auto: found no memory figure (no cgroup memory limit and no MemAvailable in "
                          f"/proc/meminfo); give a size, e.g. {flag} 8G")
    m = margin(avail)
    return AutoBudget(flag, max(0, avail - m), host.describe(), m)


def _gpu_auto(device: torch.device, free: int | None = None, total: int | None = None) -> AutoBudget:
    if free is None:
        free, total = torch.cuda.mem_get_info(device)
    m = margin(free, GPU_MARGIN_MIN)
    return AutoBudget("--gpu-mem", max(0, free - m), f"{device} has {format_size(free)} free of "
                      f"{format_size(total)} -> {format_size(free)} available", m)


def auto_budgets(gpu_mem, cpu_mem, device: torch.device, probe: ResourceProbe | None = None,
                 cuda_free: tuple[int, int] | None = None) -> Budgets:
    """gpu_mem / cpu_mem (bytes, "auto" or None) -> bytes, reading the machine when one is "auto", and the
    plan's note on the runtime's footprint (this process's RSS now, before any expert is placed).

    On the CPU the compute tier is host RAM: `--gpu-mem auto` (or `--cpu-mem auto` without --gpu-mem) sizes it
    from the host figure, and --cpu-mem has no tier of its own. cuda_free: (free, total) instead of asking
    torch.cuda (tests)."""
    probe = probe or ResourceProbe()
    host = probe.host_memory()
    device_auto = host_auto = None
    notes = [f"runtime footprint: {format_size(host.rss)} resident before experts are placed (RSS: python, "
             f"torch, tokenizer, shared libraries{'' if device.type == 'cpu' else ', CUDA context'})"]
    in_use = ", part of what is in use above (not subtracted again)"
    if device.type == "cpu":
        if gpu_mem == AUTO or (gpu_mem is None and cpu_mem == AUTO):
            flag = "--gpu-mem" if gpu_mem == AUTO else "--cpu-mem"
            device_auto = _host_auto(flag, host)
            gpu_mem = device_auto.nbytes
            notes[0] += in_use
        if cpu_mem == AUTO:
            cpu_mem = None                                  # no host tier apart from the compute tier
        elif isinstance(gpu_mem, int) and host.available is not None and gpu_mem > host.available:
            notes.append(f"warning: --gpu-mem {format_size(gpu_mem)} on top of the {format_size(host.rss)} already "
                         f"resident is more than this process may use ({host.describe()}); under a cgroup limit the "
                         f"kernel kills the process when it gets there: lower --gpu-mem or use --gpu-mem auto")
    else:
        if gpu_mem == AUTO:
            device_auto = _gpu_auto(device, *(cuda_free or (None, None)))
            gpu_mem = device_auto.nbytes
        if cpu_mem == AUTO:
            host_auto = _host_auto("--cpu-mem", host)
            cpu_mem = host_auto.nbytes
            notes[0] += in_use
    return Budgets(gpu_mem, cpu_mem, device_auto, host_auto, tuple(notes), host.rss)


# ---- threads ----------------------------------------------------------------------------------------------

def choose_threads(threads: int | None, probe: ResourceProbe | None = None, environ=None,
                   torch_default: int | None = None, current: int | None = None) -> tuple[int | None, str]:
    """(the count to set, or None to leave torch's as it is; the sentence saying why)."""
    env = os.environ if environ is None else environ
    current = torch.get_num_threads() if current is None else current
    default = _TORCH_DEFAULT_THREADS if torch_default is None else torch_default
    if threads is not None:
        return threads, f"compute threads: {threads} (threads={threads} / --threads)"
    if env.get(THREADS_ENV):
        return None, f"compute threads: {current} ({THREADS_ENV}={env[THREADS_ENV]})"
    if current != default and current not in _threads_set[-1:]:
        return None, f"compute threads: {current} (torch.set_num_threads was called before load)"
    limit = (probe or ResourceProbe()).cpu_limit()
    n = min(limit.cores, default)
    return n, f"compute threads: {n} ({limit.describe()}; torch's default {default})"


def apply_threads(threads: int | None, probe: ResourceProbe | None = None, environ=None) -> str:
    """Set torch's compute threads as choose_threads says; returns the sentence for the plan / log."""
    n, why = choose_threads(threads, probe, environ)
    if n is not None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        _threads_set[:] = [n]
    return why
