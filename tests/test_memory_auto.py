"""`--gpu-mem auto` / `--cpu-mem auto` from fake cgroup (v2, v1) and /proc files, compute threads from a fake CPU
quota and affinity, the plan saying what it measured, one-line errors for bad values, and a lean start (no
torch._dynamo, sympy or scipy imported to load the bundled model)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_engine
from moe_engine import ConfigError
from moe_engine.cli import main
from moe_engine.runtime import resources
from moe_engine.runtime.resources import (GPU_MARGIN_MIN, MARGIN_MIN, CpuLimit, ResourceProbe, auto_budgets,
                                          choose_threads)

MiB, GiB = 1 << 20, 1 << 30
CPU = torch.device("cpu")
V1_UNLIMITED = 9223372036854771712


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def meminfo(available: int | None, total: int = 64 * GiB) -> str:
    lines = [f"MemTotal:       {total // 1024} kB", "MemFree:         1000 kB"]
    if available is not None:
        lines.append(f"MemAvailable:   {available // 1024} kB")
    return "\n".join(lines) + "\n"


def v2_tree(tmp_path: Path, levels: dict[str, dict[str, str]], mem_available: int | None = 20 * GiB,
            cgroup_path: str = "/user.slice/app.scope") -> ResourceProbe:
    """A unified (v2) hierarchy: levels maps a cgroup path to its files."""
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write(proc, "self/cgroup", f"0::{cgroup_path}\n")
    write(proc, "meminfo", meminfo(mem_available))
    write(cg, "cgroup.controllers", "cpu io memory pids\n")
    for path, files in levels.items():
        for name, text in files.items():
            write(cg, f"{path.strip('/')}/{name}".lstrip("/"), text)
    return ResourceProbe(proc, cg, rss=300 * MiB, affinity=4)


def v1_tree(tmp_path: Path, memory: dict[str, str], cpu: dict[str, str] | None = None,
            mem_available: int | None = 20 * GiB, path: str = "/process_api/abc") -> ResourceProbe:
    """A cgroup v1 (hybrid) layout: memory and cpu,cpuacct controllers mounted apart, v2 without controllers."""
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write(proc, "self/cgroup", f"5:cpu,cpuacct:{path}\n4:memory:{path}\n0::/\n")
    write(proc, "meminfo", meminfo(mem_available))
    write(cg, "unified/cgroup.controllers", "")
    write(cg, "memory/memory.limit_in_bytes", f"{V1_UNLIMITED}\n")            # the root: no limit
    write(cg, "memory/memory.usage_in_bytes", f"{5 * GiB}\n")
    for name, text in memory.items():
        write(cg, f"memory{path}/{name}", text)
    for name, text in (cpu or {}).items():
        write(cg, f"cpu,cpuacct{path}/{name}", text)
    return ResourceProbe(proc, cg, rss=300 * MiB, affinity=4)


# ---- memory figures ----------------------------------------------------------------------------------------

def test_cgroup_v2_limit_minus_usage(tmp_path):
    probe = v2_tree(tmp_path, {"/user.slice": {"memory.max": "max\n", "memory.current": f"{3 * GiB}\n"},
                               "/user.slice/app.scope": {"memory.max": f"{1300 * MiB}\n",
                                                         "memory.current": f"{250 * MiB}\n",
                                                         "memory.stat": f"anon 1\ninactive_file {40 * MiB}\n"}})
    host = probe.host_memory()
    assert host.cgroup.version == 2 and host.cgroup.limit == 1300 * MiB and host.cgroup.in_use == 210 * MiB
    assert host.available == 1090 * MiB and host.rss == 300 * MiB
    b = auto_budgets("auto", None, CPU, probe)
    assert b.gpu_mem == 1090 * MiB - MARGIN_MIN and b.cpu_mem is None                 # 5% < 64 MiB
    text = b.device_auto.describe()
    assert text.startswith("--gpu-mem auto: cgroup v2 limit 1.27 GiB, 210.00 MiB in use"), text
    assert "reclaimable page cache" in text and "MemAvailable 20.00 GiB -> 1.06 GiB available" in text


def test_cgroup_v2_memory_high_and_a_tighter_parent(tmp_path):
    probe = v2_tree(tmp_path, {"/user.slice": {"memory.max": f"{2 * GiB}\n", "memory.current": f"{1800 * MiB}\n"},
                               "/user.slice/app.scope": {"memory.max": "max\n", "memory.high": f"{1 * GiB}\n",
                                                         "memory.current": f"{100 * MiB}\n"}})
    cg = probe.cgroup_memory()
    assert cg.path.endswith("user.slice") and cg.headroom == 248 * MiB      # the parent leaves less
    (tmp_path / "cgroup/user.slice/memory.max").write_text("max\n")
    cg = probe.cgroup_memory()
    assert cg.path.endswith("app.scope") and cg.limit == 1 * GiB             # memory.high counts as a limit


def test_cgroup_v2_max_means_no_limit(tmp_path):
    probe = v2_tree(tmp_path, {"/user.slice/app.scope": {"memory.max": "max\n", "memory.current": f"{GiB}\n"}},
                    mem_available=8 * GiB)
    host = probe.host_memory()
    assert host.cgroup is None and host.available == 8 * GiB
    assert "no cgroup memory limit, MemAvailable 8.00 GiB -> 8.00 GiB available" in host.describe()
    assert auto_budgets("auto", None, CPU, probe).gpu_mem == 8 * GiB - int(8 * GiB * 0.05)


def test_cgroup_v1_limit(tmp_path):
    probe = v1_tree(tmp_path, {"memory.limit_in_bytes": f"{600 * MiB}\n", "memory.usage_in_bytes": f"{200 * MiB}\n",
                               "memory.stat": f"cache 9\ntotal_inactive_file {10 * MiB}\n"})
    host = probe.host_memory()
    assert host.cgroup.version == 1 and host.cgroup.limit == 600 * MiB and host.cgroup.in_use == 190 * MiB
    assert host.available == 410 * MiB
    b = auto_budgets("auto", None, CPU, probe)
    assert b.gpu_mem == 410 * MiB - MARGIN_MIN and b.device_auto.margin == MARGIN_MIN   # 5% < 64 MiB


def test_cgroup_v1_unlimited_and_meminfo_decides(tmp_path):
    probe = v1_tree(tmp_path, {"memory.limit_in_bytes": f"{V1_UNLIMITED}\n", "memory.usage_in_bytes": f"{GiB}\n"},
                    mem_available=3 * GiB)
    assert probe.cgroup_memory() is None and probe.host_memory().available == 3 * GiB


def test_meminfo_smaller_than_the_cgroup_headroom(tmp_path):
    probe = v1_tree(tmp_path, {"memory.limit_in_bytes": f"{16 * GiB}\n", "memory.usage_in_bytes": f"{GiB}\n"},
                    mem_available=2 * GiB)
    host = probe.host_memory()
    assert host.cgroup.headroom == 15 * GiB and host.available == 2 * GiB


def test_cgroup_path_of_another_namespace_reads_the_mount_root(tmp_path):
    """Inside a container /proc/self/cgroup may name a host path that is not mounted; its root is the container's."""
    probe = v1_tree(tmp_path, {}, path="/docker/0123")
    (tmp_path / "cgroup/memory/memory.limit_in_bytes").write_text(f"{GiB}\n")
    (tmp_path / "cgroup/memory/memory.usage_in_bytes").write_text(f"{100 * MiB}\n")
    assert probe.cgroup_memory().headroom == GiB - 100 * MiB


def test_no_memory_figure_at_all(tmp_path):
    probe = v2_tree(tmp_path, {}, mem_available=None)
    with pytest.raises(ConfigError, match="--gpu-mem auto: found no memory figure"):
        auto_budgets("auto", None, CPU, probe)


def test_cpu_mem_auto_on_the_cpu_sizes_the_compute_tier(tmp_path):
    probe = v2_tree(tmp_path, {}, mem_available=4 * GiB)
    b = auto_budgets(None, "auto", CPU, probe)
    assert b.gpu_mem == 4 * GiB - int(4 * GiB * 0.05) and b.cpu_mem is None
    assert b.device_auto.describe().startswith("--cpu-mem auto:")
    assert auto_budgets(6 * GiB, "auto", CPU, probe).cpu_mem is None           # no host tier apart on the CPU


def test_gpu_auto_takes_free_device_memory_and_cpu_auto_the_host(tmp_path):
    probe = v2_tree(tmp_path, {}, mem_available=30 * GiB)
    b = auto_budgets("auto", "auto", torch.device("cuda:0"), probe, cuda_free=(2 * GiB, 24 * GiB))
    assert b.gpu_mem == 2 * GiB - GPU_MARGIN_MIN                                 # 5% of 2 GiB < 256 MiB
    assert b.cpu_mem == 30 * GiB - int(30 * GiB * 0.05)
    assert "cuda:0 has 2.00 GiB free of 24.00 GiB" in b.device_auto.describe()
    assert b.host_auto.describe().startswith("--cpu-mem auto: no cgroup memory limit")


def test_explicit_budget_over_what_is_available_is_noted(tmp_path):
    probe = v2_tree(tmp_path, {}, mem_available=1 * GiB)
    b = auto_budgets(8 * GiB, None, CPU, probe)
    assert b.gpu_mem == 8 * GiB and any("more than this process may use" in n for n in b.notes)


# ---- threads -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files,affinity,cores", [
    ({"cpu.max": "150000 100000\n"}, 4, 1),          # 1.5 CPUs -> 1
    ({"cpu.max": "250000 100000\n"}, 4, 2),
    ({"cpu.max": "max 100000\n"}, 4, 4),             # no quota: the affinity
    ({"cpu.max": "800000 100000\n"}, 3, 3),          # the affinity is smaller
    ({"cpu.max": "20000 100000\n"}, 4, 1),           # 0.2 CPUs -> at least 1
])
def test_cores_from_cgroup_v2_cpu_max_and_affinity(tmp_path, files, affinity, cores):
    probe = v2_tree(tmp_path, {"/user.slice/app.scope": files})
    probe._affinity = affinity
    assert probe.cpu_limit().cores == cores


def test_cores_from_cgroup_v1_cfs_quota(tmp_path):
    probe = v1_tree(tmp_path, {}, cpu={"cpu.cfs_quota_us": "300000\n", "cpu.cfs_period_us": "100000\n"})
    limit = probe.cpu_limit()
    assert limit.cores == 3 and "cpu.cfs_quota_us 300000" in limit.describe()
    (tmp_path / "cgroup/cpu,cpuacct/process_api/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert probe.cpu_limit() == CpuLimit(4, None, "")


def test_choose_threads(tmp_path):
    probe = v2_tree(tmp_path, {"/user.slice/app.scope": {"cpu.max": "200000 100000\n"}})
    n, why = choose_threads(None, probe, environ={}, torch_default=8, current=8)
    assert n == 2 and "cpu.max 200000 100000 = 2 CPUs" in why and "4 cores in the CPU affinity" in why
    assert choose_threads(None, probe, environ={}, torch_default=1, current=1)[0] == 1   # torch's default caps it
    assert choose_threads(3, probe, environ={"OMP_NUM_THREADS": "1"})[0] == 3            # threads= wins
    n, why = choose_threads(None, probe, environ={"OMP_NUM_THREADS": "1"}, current=1)
    assert n is None and "OMP_NUM_THREADS=1" in why
    n, why = choose_threads(None, probe, environ={}, torch_default=8, current=5)       # the caller set 5
    assert n is None and "torch.set_num_threads" in why


@pytest.fixture
def torch_threads():
    """torch's thread count as at start (so load() may choose it) and restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(resources._TORCH_DEFAULT_THREADS)
    yield
    torch.set_num_threads(before)
    resources._threads_set[:] = []


def test_load_applies_threads(torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    eng = moe_engine.load(None, device="cpu", threads=1, progress=False)
    assert torch.get_num_threads() == 1
    eng.close()


# ---- the plan and its errors -------------------------------------------------------------------------------

def fake_machine(monkeypatch, tmp_path, limit: int, usage: int):
    probe = v2_tree(tmp_path, {"/user.slice/app.scope": {"memory.max": f"{limit}\n", "memory.current": f"{usage}\n",
                                                         "cpu.max": "100000 100000\n"}})
    monkeypatch.setattr(resources, "ResourceProbe", lambda: probe)


def test_plan_says_what_it_measured(monkeypatch, tmp_path, capsys, torch_threads):
    fake_machine(monkeypatch, tmp_path, 1300 * MiB, 210 * MiB)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    eng = moe_engine.load(None, device="cpu", gpu_mem="auto")
    err = capsys.readouterr().err
    avail = 1090 * MiB
    assert eng.plan.device_budget == avail - MARGIN_MIN
    assert ("memory: --gpu-mem auto: cgroup v2 limit 1.27 GiB, 210.00 MiB in use, MemAvailable 20.00 GiB -> "
            "1.06 GiB available; margin 64.00 MiB -> 1.00 GiB; experts get") in err, err
    assert "runtime footprint: 300.00 MiB resident before experts are placed" in err
    assert "compute threads: 1 (4 cores in the CPU affinity, cgroup v2 cpu.max 100000 100000 = 1 CPU;" in err
    assert "of --gpu-mem auto = 1.00 GiB" in err
    assert eng.stats()["memory"]["device_budget_bytes"] == eng.plan.device_budget
    eng.close()


def test_auto_too_small_is_one_line_naming_the_flag(monkeypatch, tmp_path):
    fake_machine(monkeypatch, tmp_path, 300 * MiB, 290 * MiB)
    with pytest.raises(ConfigError) as info:
        moe_engine.load(None, device="cpu", gpu_mem="auto", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("gpu_mem auto: cgroup v2 limit 300.00 MiB, 290.00 MiB in use")
    assert "-> 10.00 MiB available; margin 64.00 MiB -> 0 B, less than the" in msg
    assert "this model needs on cpu (non-expert weights" in msg and "give gpu_mem a size" in msg   # load()'s words


@pytest.mark.parametrize("flag,value", [("--gpu-mem", "autoo"), ("--cpu-mem", "au to"), ("--threads", "0")])
def test_bad_values_name_the_flag(capsys, flag, value):
    code = main(["generate", "--prompt", "hi", "--no-progress", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("moe-engine: error: ") and err.count("\n") == 1, err
    assert flag in err and value in err


@pytest.mark.parametrize("kw,needle", [({"gpu_mem": "autoo"}, "gpu_mem"), ({"cpu_mem": "AUTO!"}, "cpu_mem"),
                                       ({"threads": 0}, "threads=0"), ({"threads": "2"}, "threads"),
                                       ({"threads": True}, "threads")])
def test_bad_load_keywords(kw, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        moe_engine.load(None, progress=False, **kw)
    assert "\n" not in str(info.value)


# ---- a lean start ------------------------------------------------------------------------------------------

def test_loading_the_bundled_model_imports_no_compiler_stack():
    code = ("import sys, moe_engine; moe_engine.load(progress=False).close(); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(moe_engine.__file__).parent.parent).stdout
    assert out.strip() == "[]", out


def test_simulate_refuses_auto(tmp_path, capsys):
    """simulate models other hardware: auto (this machine) makes no sense there, and says so in one line."""
    import numpy as np

    from moe_engine.profiling.trace import Trace, save_trace
    path = tmp_path / "t.npz"
    ex = np.array([[[0, 1]], [[1, 2]]], dtype=np.int16)
    save_trace(path, Trace(ex, np.ones(ex.shape, np.float32), np.array([0, 2]), num_experts=4))
    assert main(["simulate", "--trace", str(path), "--expert-bytes", "4096", "--gpu-mem", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-mem auto measures this machine" in err, err
