"""The step protocol between rank 0 and the workers: one command at a time, each a fixed sequence of collectives.

    every command   header int64 [8] broadcast from rank 0 on the control group (gloo)
                    [command, layer, N, K, dtype, forecast layers, decoding (-1: unchanged), notes follow]
    LAYER           (notes: broadcast_object_list of the scheduler's hint and a verify step's prefetch, {layer:
                    expert ids} each, on the control group)
                    payload uint8 broadcast from rank 0 on the data group: x [N, D] (model dtype), weights [N, K]
                    float32, ids [N, K] int64, forecast layers [F] int64, forecast scores [F, N, E] float32
                    -> every rank computes its pairs (shard.Shard.compute) -> all_reduce(sum) of float32 [N, D]
    STATS           gather_object of each rank's figures to rank 0 (control group)
    PING            nothing more: rank 0 sends one every PING_S seconds while idle, so a worker never waits on a
                    collective longer than its timeout and rank 0 learns of a lost worker while nobody asks
    STOP            the workers leave their loop

Dispatch is a broadcast of the layer's hidden states and routing (every rank needs every token it might own a
pair of; at decode batch sizes N x D is a few KiB), combine is one all_reduce of the partial outputs: the
all-gather + reduce-scatter pattern with the gather replaced by a broadcast, since only rank 0 holds the
hidden states. An all_to_all would send each rank only its tokens and return only its rows; at small N it
costs more collectives of the same latency (bench/bench_expert_parallel.py times both).

The data group is the default process group (NCCL on CUDA, gloo on CPU); the control group is gloo.
A lock keeps one command's collectives together (the server's loop thread steps while /metrics asks for stats).
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

LAYER, STATS, PING, STOP = 1, 2, 3, 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEADER = 8
PING_S = 5.0


def _ids(experts: dict) -> dict[int, frozenset[int]]:
    return {int(m): frozenset(int(e) for e in ids) for m, ids in experts.items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def pack(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, forecast: dict[int, torch.Tensor]) -> torch.Tensor:
    layers = torch.tensor(sorted(forecast), dtype=torch.int64, device=x.device)
    parts = [x, weights.float(), ids.long(), layers]
    if forecast:
        parts.append(torch.stack([forecast[m].float() for m in sorted(forecast)]))
    return torch.cat([_bytes(p) for p in parts])


def unpack(buf: torch.Tensor, n: int, k: int, d: int, e: int, f: int, dtype: torch.dtype):
    sizes = [n * d * dtype.itemsize, n * k * 4, n * k * 8, f * 8, f * n * e * 4]
    x, w, i, lay, sc = torch.split(buf, sizes)
    x, w, i = x.view(dtype).view(n, d), w.view(torch.float32).view(n, k), i.view(torch.int64).view(n, k)
    scores = sc.view(torch.float32).view(f, n, e)
    return x, w, i, {int(m): scores[j] for j, m in enumerate(lay.view(torch.int64).tolist())}


def payload_size(n: int, k: int, d: int, e: int, f: int, dtype: torch.dtype) -> int:
    return n * d * dtype.itemsize + n * k * 12 + f * 8 + f * n * e * 4


class Link:
    """Rank 0's end: sends commands, times the collectives (comm seconds), and runs its own shard's part."""

    def __init__(self, control, data, device: torch.device, hidden: int, num_experts: int):
        self.control, self.data, self.device = control, data, device
        self.hidden, self.num_experts = hidden, num_experts
        self.lock = threading.Lock()
        self.comm_s = 0.0                 # seconds in collectives (header, payload, all_reduce)
        self.layer_calls = 0
        self.bytes_sent = 0               # payload bytes broadcast
        self.last_command = time.monotonic()
        self._decoding: int = -1          # the step's decode flag, sent with its first layer
        self._notes: dict = {}            # hint / prefetch for the workers, sent with the next layer

    def begin_step(self, decoding: bool) -> None:
        self._decoding = int(decoding)

    def hint(self, experts: dict) -> None:
        """Scheduling hints for every rank's cache, sent with the next layer (the last one given wins)."""
        self._notes["hint"] = _ids(experts)

    def prefetch(self, experts: dict, keep: dict | None) -> None:
        """Forecast experts to start loading on every rank, sent with the next layer."""
        self._notes["prefetch"] = (_ids(experts), None if keep is None else _ids(keep))

    def _header(self, *fields: int) -> None:
        head = torch.tensor(list(fields) + [0] * (HEADER - len(fields)), dtype=torch.int64)
        dist.broadcast(head, 0, group=self.control)
        self.last_command = time.monotonic()

    def layer(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              forecast: dict[int, torch.Tensor], local) -> torch.Tensor:
        """Send the layer to every rank, add this rank's part (local(forecast) -> float32 [N, D]), all_reduce."""
        n, k = ids.shape
        t0 = time.perf_counter()
        notes, self._notes = self._notes, {}
        self._header(LAYER, layer, n, k, DTYPES.index(x.dtype), len(forecast), self._decoding, bool(notes))
        self._decoding = -1
        if notes:
            dist.broadcast_object_list([notes], 0, group=self.control)
        buf = pack(x, weights, ids, forecast)
        dist.broadcast(buf, 0, group=self.data)
        t1 = time.perf_counter()
        part = local()
        t2 = time.perf_counter()
        dist.all_reduce(part, group=self.data)
        self.comm_s += (t1 - t0) + (time.perf_counter() - t2)
        self.layer_calls += 1
        self.bytes_sent += buf.numel()
        return part

    def gather_stats(self, mine: dict) -> list[dict]:
        self._header(STATS)
        out = [None] * dist.get_world_size(self.control)
        dist.gather_object(mine, out, dst=0, group=self.control)
        return out

    def ping(self) -> None:
        self._header(PING)

    def stop(self) -> None:
        self._header(STOP)


class PeerLost(Exception):
    """A worker's collective failed: rank 0 is gone, or another rank is (rank 0 names which and why)."""


def _peers(collective, *args, **kw):
    """collective(*args, **kw); the backend's error (of any type) becomes PeerLost, so that a worker tells a lost
    peer (nothing to report) from a failure of its own work (reported to rank 0 under its rank)."""
    try:
        return collective(*args, **kw)
    except Exception as e:   # noqa: BLE001 - gloo and NCCL raise RuntimeError and its subclasses
        raise PeerLost(f"{type(e).__name__}: {e}") from e


def serve_commands(shard, control, data, device: torch.device, hidden: int, num_experts: int, stats) -> None:
    """A worker's loop: run rank 0's commands until STOP. stats() -> this rank's figures for STATS.
    PeerLost when a collective fails; an error of the rank's own work (its experts, its stats) as raised."""
    head = torch.zeros(HEADER, dtype=torch.int64)
    while True:
        _peers(dist.broadcast, head, 0, group=control)
        cmd, layer, n, k, dt, f, decoding, has_notes = head.tolist()
        if cmd == STOP:
            return
        if cmd == STATS:
            _peers(dist.gather_object, stats(), None, dst=0, group=control)
            continue
        if cmd != LAYER:
            continue
        if has_notes:
            box = [None]
            _peers(dist.broadcast_object_list, box, 0, group=control)
            if "hint" in box[0]:
                shard.hint(box[0]["hint"])
            if "prefetch" in box[0]:
                shard.prefetch(*box[0]["prefetch"])
        if decoding >= 0:
            shard.begin(bool(decoding))
        dtype = DTYPES[dt]
        buf = torch.empty(payload_size(n, k, hidden, num_experts, f, dtype), dtype=torch.uint8, device=device)
        _peers(dist.broadcast, buf, 0, group=data)
        x, w, i, forecast = unpack(buf, n, k, hidden, num_experts, f, dtype)
        part = shard.compute(layer, x, w, i, forecast)
        _peers(dist.all_reduce, part, group=data)
