"""The host-RAM tier for GPU compute: packed experts in pinned memory, copied to device slots.

Used only when a GPU computes. Each expert the GPU misses comes from here: if it is not yet in
host RAM it is first read from disk (direct IO) into a host slot, then copied to its device
slot on a CUDA stream this tier owns; the copy's event is kept on the job so compute waits on
exactly that expert (`wait_device`). Before a device slot is overwritten, the copy stream
waits for the last compute that read it (`note_use`), so an expert is never replaced under a
running kernel. The host tier has its own per-layer LRU table (`--cpu-mem` bounds it); when
it holds every expert, they are all read at start.

Hybrid execution: `cost` decides per missed expert whether copying it (bytes / measured
host-to-device bandwidth) or computing it on the CPU from host RAM (tokens x FLOPs / measured
CPU rate) is faster; see costmodel.py.
"""
from __future__ import annotations

import threading

import torch
from tqdm.auto import tqdm

from .. import _ops
from .policies import LRU
from .storage import read_expert_bytes
from .table import SlotTable, expert_size


class HostTier:
    def __init__(self, checkpoint, plan, dtype: torch.dtype, device: torch.device, io_threads: int = 2,
                 pinned: bool = True, progress: bool = True):
        self.ckpt, self.dtype, self.device = checkpoint, dtype, device
        self.expert_bytes, self.slot_bytes = plan.expert_bytes, plan.slot_bytes
        spec = checkpoint.spec
        per_layer = max(1, plan.host_slots // max(1, len(spec.moe_layers)))
        quotas = [0] * len(plan.quotas)
        for layer in spec.moe_layers:
            quotas[layer] = min(per_layer, plan.num_experts)
        self.table = SlotTable(quotas, plan.num_experts, LRU())
        self.storage = _ops.alloc_aligned(max(1, self.table.capacity * self.slot_bytes), pinned=pinned)
        self.reader = _ops.DirectReader(num_threads=io_threads)
        self.ready: set[tuple[int, int]] = set()          # experts whose host bytes are complete
        self._busy: dict[tuple[int, int], int] = {}       # experts a loader thread is copying from
        self._copy_done: dict[int, object] = {}           # host slot -> event of its last device copy
        self._lock = threading.Lock()
        self._step = 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._slot_use: dict[int, object] = {}           # device slot -> event of the last compute reading it
        if self.table.capacity >= plan.total_experts:
            self._load_all(spec, progress)

    def host_view(self, layer: int, expert: int) -> torch.Tensor | None:
        """Packed view of the expert in host RAM, or None when it is not there."""
        with self._lock:
            if (layer, expert) not in self.ready:
                return None
            slot = self.table.slot_of[layer][expert]
        return self.storage[slot * self.slot_bytes: slot * self.slot_bytes + self.size(layer, expert)].view(self.dtype)

    def size(self, layer: int, expert: int) -> int:
        """Bytes of one packed expert (quantized experts of a mixed-precision entry differ in size)."""
        return expert_size(self.ckpt, layer, expert, self.expert_bytes)

    def _load_all(self, spec, progress: bool) -> None:
        total = len(spec.moe_layers) * self.table.num_experts
        with tqdm(total=total, desc="experts -> host RAM", unit="expert", disable=not progress, leave=False) as bar:
            for layer in spec.moe_layers:
                for e in range(self.table.num_experts):
                    self._ensure(layer, e)
                    self._release(layer, e)
                    bar.update()

    def _ensure(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's host bytes (uint8), reading it from disk first when needed.

        Experts being read, or being copied by another loader thread, are never evicted; a host
        slot whose last device copy may still be running is reused only after that copy's event.
        """
        with self._lock:
            fresh = not self.table.contains(layer, expert)
            if fresh:
                self._step += 1
                self.table.lookup(layer, [expert], self._step)
                busy = [e for e in self.table.resident_experts(layer)
                        if (layer, e) not in self.ready or self._busy.get((layer, e))]
                placed = self.table.place(layer, expert, self._step, protected=busy)
                if placed is None:
                    raise RuntimeError(f"host tier: every host slot of layer {layer} is busy; raise --cpu-mem")
                self.ready.discard((layer, placed[1]))
            self._busy[(layer, expert)] = self._busy.get((layer, expert), 0) + 1
            slot = self.table.slot_of[layer][expert]
        view = self.storage[slot * self.slot_bytes: slot * self.slot_bytes + self.size(layer, expert)]
        if fresh:
            pending = self._copy_done.pop(slot, None)
            if pending is not None:
                pending.synchronize()
            try:
                read_expert_bytes(self.ckpt, self.reader, layer, expert, view, self.dtype)
            except BaseException:
                with self._lock:
                    self.table.remove(layer, expert)
                    self._busy.pop((layer, expert), None)
                raise
            with self._lock:
                self.ready.add((layer, expert))
        return view, slot

    def _release(self, layer: int, expert: int) -> None:
        with self._lock:
            self._busy[(layer, expert)] -= 1

    def load_to_device(self, job, storage: torch.Tensor, slot_bytes: int) -> None:
        """Loader thread: bring the job's expert into its device slot (disk -> host -> device)."""
        src, host_slot = self._ensure(job.layer, job.expert)
        try:
            dst = storage[job.slot * slot_bytes: job.slot * slot_bytes + src.numel()]
            if self.stream is None:
                dst.copy_(src)
                return
            last = self._slot_use.get(job.slot)
            if last is not None:
                self.stream.wait_event(last)
            job.extra["event"] = event = _ops.copy_h2d_async(src, dst, self.stream)
            self._copy_done[host_slot] = event
        finally:
            self._release(job.layer, job.expert)

    def wait_device(self, job) -> None:
        """Compute side: make the current stream wait for the job's copy (no CPU stall on GPU)."""
        event = job.extra.get("event")
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def note_use(self, slot: int) -> None:
        """Compute side: the current stream has queued reads of `slot`; later copies into it wait for them."""
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._slot_use[slot] = event

    @property
    def holds_all(self) -> bool:
        return len(self.ready) == self.table.capacity == sum(1 for q in self.table.quotas if q) * self.table.num_experts

    @property
    def bytes_disk_read(self) -> int:
        return self.reader.bytes_disk_read

    def nbytes(self) -> int:
        return self.storage.numel()

    def close(self) -> None:
        self.reader.close()
