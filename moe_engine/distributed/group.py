"""Rendezvous, startup agreement and failure detection for the ranks of one expert-parallel engine.

    Rendezvous   torch.distributed's env:// variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK),
                 set by torchrun or by spawn_workers(); rank 0 hosts the TCPStore unless torchrun's agent does
                 (TORCHELASTIC_USE_AGENT_STORE); the process group is gloo on CPU, NCCL on CUDA (data) with a
                 gloo group beside it (commands), every collective bounded by COLLECTIVE_TIMEOUT
    Startup      through the store, so that rank 0 keeps checking the others while it waits: each rank posts
                 that it joined, its fingerprint (checkpoint hash and engine settings), then the result of its
                 build (its placement plan, or its error); rank 0 compares, then posts "go" or why not
    Liveness     every worker bumps beat/RANK in the store each second and writes its exception to error/RANK
                 before it exits; rank 0 watches the processes it spawned. When a collective fails, diagnose()
                 names the rank and the cause: exit code or signal, the rank's own error, or a silent heartbeat
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import MoeEngineError

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)   # one collective (a layer's experts on the slowest rank)
JOIN_TIMEOUT = 120.0                                   # seconds for every rank to reach the store
BEAT_S = 1.0                                           # a worker's heartbeat period
SILENT_S = 3.0                                         # no heartbeat for this long: the rank is lost
WORKER_MODULE = "moe_engine.distributed.worker"
CONFIG_ENV = "MOE_ENGINE_EP_CONFIG"                    # a spawned worker's pickled EngineConfig
ROOT = Path(__file__).resolve().parents[2]             # spawned workers import this moe_engine, whatever the cwd


class RankError(MoeEngineError):
    """A rank of an expert-parallel engine died, failed or disagrees; the message names the rank and the cause."""


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None when this process was not launched so."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    except (KeyError, ValueError):
        raise MoeEngineError("WORLD_SIZE is set but RANK is missing or not a number; launch with torchrun, or "
                             "unset WORLD_SIZE to let moe-engine start its ranks") from None


def connect_store(rank: int, world: int, port: int | None = None) -> dist.Store:
    """The rendezvous store of MASTER_ADDR:MASTER_PORT (hosted by rank 0, or by torchrun's agent); port: a local
    store on 127.0.0.1 instead (rank 0 of spawned workers)."""
    if port is not None:
        host, port, agent = "127.0.0.1", str(port), False
    else:
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT")
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if port is None or not port.isdigit():
        raise MoeEngineError(f"MASTER_PORT is {port!r}: set MASTER_ADDR and MASTER_PORT (torchrun does) for "
                             f"--expert-parallel across processes")
    try:
        store = dist.TCPStore(host, int(port), world, is_master=rank == 0 and not agent, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=JOIN_TIMEOUT))
    except Exception as e:   # noqa: BLE001 - the rendezvous failed: one line that names the address
        raise MoeEngineError(f"rank {rank} could not reach the rendezvous store at {host}:{port} "
                             f"({type(e).__name__}: {_first_line(e)}); check MASTER_ADDR / MASTER_PORT") from None
    return dist.PrefixStore("moe_engine/", store)


def init_groups(store, rank: int, world: int, device):
    """The process group (gloo, or NCCL for CUDA tensors on `device`) and a gloo group for commands."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)             # NCCL binds its communicator to the current device
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("pg/", store), rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if cuda else dist.group.WORLD
    return control, dist.group.WORLD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}"


class Spawned:
    """Workers 1..N-1 started by this process (moe_engine.load(expert_parallel=N) or the CLI without torchrun)."""

    def __init__(self, world: int, config_path: Path, port: int):
        self.logs, self.procs = {}, {}
        for rank in range(1, world):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), CONFIG_ENV: str(config_path)}
            env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
            log = tempfile.NamedTemporaryFile("w+", prefix=f"moe-engine-rank{rank}-", suffix=".log", delete=False)
            self.logs[rank] = log
            self.procs[rank] = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], env=env, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def exited(self, rank: int) -> str | None:
        """Why worker `rank` is gone (exit code or signal, and the last line it printed), or None while it runs."""
        code = self.procs[rank].poll()
        if code is None:
            return None
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        last = self._last_line(rank)
        return f"rank {rank} (pid {self.procs[rank].pid}) {how}" + (f": {last}" if last and code > 0 else "")

    def _last_line(self, rank: int) -> str:
        try:
            lines = [ln.strip() for ln in Path(self.logs[rank].name).read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        lines = [ln for ln in lines if ln]
        return lines[-1][:300] if lines else ""

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs.values():
            log.close()
            Path(log.name).unlink(missing_ok=True)


class Watch:
    """Rank 0's view of the other ranks: waits on store keys while checking that every rank is alive."""

    def __init__(self, store, world: int, spawned: Spawned | None):
        self.store, self.world, self.spawned = store, world, spawned
        self._beats: dict[int, tuple[int, float]] = {}

    def lost(self) -> str | None:
        """A one-line reason when some worker is gone (exit, error posted, or silent), else None."""
        for r in range(1, self.world):
            posted = self.posted_error(r)
            if posted:
                return f"rank {r} failed: {posted}"
            gone = self.spawned.exited(r) if self.spawned is not None else None
            if gone:
                return gone
        now = time.monotonic()
        for r in range(1, self.world):
            beat = self._beat(r)
            seen, when = self._beats.get(r, (beat, now))
            if beat != seen or r not in self._beats:
                self._beats[r] = (beat, now)
            elif beat > 0 and now - when > SILENT_S:
                return f"rank {r} stopped responding (no heartbeat for {now - when:.0f} s: it died, hung or lost its network)"
        return None

    def posted_error(self, rank: int) -> str | None:
        key = f"error/{rank}"
        if self.store.check([key]):
            return self.store.get(key).decode(errors="replace")
        return None

    def _beat(self, rank: int) -> int:
        key = f"beat/{rank}"
        return int(self.store.get(key)) if self.store.check([key]) else 0

    def wait_all(self, prefix: str, what: str, timeout: float | None = None) -> list[bytes]:
        """Every worker's value of `prefix`RANK, checking liveness meanwhile; RankError naming the rank otherwise."""
        keys = [f"{prefix}{r}" for r in range(1, self.world)]
        start = time.monotonic()
        while not self.store.check(keys):
            why = self.lost()
            if why:
                raise RankError(f"expert parallelism could not start: {why} (while {what})")
            if timeout is not None and time.monotonic() - start > timeout:
                missing = [r for r, k in zip(range(1, self.world), keys) if not self.store.check([k])]
                raise RankError(f"expert parallelism could not start: rank(s) {missing} did not join within "
                                f"{timeout:.0f} s (while {what}); check that every rank was launched with the same "
                                f"MASTER_ADDR / MASTER_PORT and WORLD_SIZE={self.world}")
            time.sleep(0.05)
        return [self.store.get(k) for k in keys]

    def diagnose(self, exc: BaseException, window: float = SILENT_S + 1.0) -> str:
        """Why a collective failed: the rank and the cause, within `window` seconds."""
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            why = self.lost()
            if why:
                return why
            time.sleep(0.1)
        return f"a collective with the other ranks failed ({one_line(exc)})"


def heartbeat(rank: int, world: int) -> None:
    """A worker's daemon thread bumping beat/RANK every BEAT_S seconds (on its own store connection)."""
    def run():
        store = connect_store(rank, world)
        while True:
            store.add(f"beat/{rank}", 1)
            time.sleep(BEAT_S)
    threading.Thread(target=run, name=f"moe-engine-beat-{rank}", daemon=True).start()


def post(store, key: str, value) -> None:
    store.set(key, pickle.dumps(value))


def fingerprint(model_dir: Path, settings: dict) -> dict:
    """What every rank must agree on: config.json and every safetensors header (with the file's size) hashed, plus
    the settings that decide what is computed."""
    out = {"config.json": _sha(Path(model_dir) / "config.json")}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            out[f.name] = f"{f.stat().st_size}:{hashlib.sha256(fh.read(min(n, 100 << 20))).hexdigest()[:16]}"
    return {"checkpoint": out, "settings": {k: json.dumps(v, default=str) for k, v in settings.items()}}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def differences(mine: dict, theirs: dict) -> str | None:
    """What differs between rank 0's fingerprint and another's, in words, or None."""
    for part in ("checkpoint", "settings"):
        a, b = mine[part], theirs[part]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                if part == "checkpoint":
                    return (f"its checkpoint differs from rank 0's in {key} ("
                            f"{'missing' if key not in b else 'different contents'} there)")
                return f"its {key} is {b.get(key)} where rank 0 has {a.get(key)}"
    return None
