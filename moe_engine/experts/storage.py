"""Slot storage: the compute tier's expert slots and the work that fills one (run on a loader thread).

    storage [slots x slot_bytes] uint8 (aligned CPU memory, or device memory)
    load(job, worker):  disk -> slot with the direct-IO reader (CPU compute; converted through a staging
                        buffer when the bytes on disk are not the packed expert), or host RAM -> device slot
                        (GPU compute, host.HostTier)
    view(layer, expert, slot): the packed expert in its slot, as the model dtype

A failed or short read raises (ExpertReadError) on the loader thread; the controller then never marks
the expert ready. After every read the source's files are checked against what was loaded
(`check_unchanged`: inode, size, mtime, ctime), so a checkpoint overwritten under a running engine fails
the read (and every later one) with a CheckpointError instead of changing outputs. Knows nothing of
which expert goes where or when: the controller decides that.
"""
from __future__ import annotations

import torch

from .. import _ops
from ..errors import ExpertReadError
from .plan import ALIGN, Placement
from .table import expert_size


class SlotStorage:
    def __init__(self, checkpoint, plan: Placement, dtype: torch.dtype, device: torch.device, io_threads: int,
                 host=None):
        self.ckpt, self.dtype, self.device, self.host = checkpoint, dtype, device, host
        self.expert_bytes, self.slot_bytes = plan.expert_bytes, plan.slot_bytes
        slots = sum(plan.quotas)
        self.buffer = self._alloc(slots * self.slot_bytes)               # [slots * slot_bytes] uint8
        self.reader = _ops.DirectReader(num_threads=io_threads) if host is None else None
        self.direct = checkpoint.raw_is_packed(dtype)    # every expert's bytes on disk are packed: no staging
        self.staging = [] if self.direct or host is not None else \
            [_ops.alloc_aligned(plan.slot_bytes) for _ in range(io_threads)]
        self.shift = [0] * slots                           # where in its slot each expert starts (see _in_place_shift)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return _ops.alloc_aligned(max(nbytes, 1))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)

    def size(self, layer: int, expert: int) -> int:
        return expert_size(self.ckpt, layer, expert, self.expert_bytes)

    def view(self, layer: int, expert: int, slot: int) -> torch.Tensor:
        """The packed expert in `slot` (where its load put it), as the model dtype."""
        start = slot * self.slot_bytes + self.shift[slot]
        return self.buffer[start: start + self.size(layer, expert)].view(self.dtype)

    def load(self, job, worker: int) -> tuple[int, int]:
        """Bring the job's expert into its slot; returns (bytes loaded, bytes copied host to device)."""
        n = self.size(job.layer, job.expert)
        if self.host is not None:
            self.host.load_to_device(job, self.buffer, self.slot_bytes)
            return n, n if self.device.type == "cuda" else 0
        start = job.slot * self.slot_bytes
        shift = self._in_place_shift(job, start)
        self.shift[job.slot] = shift
        dest = self.buffer[start + shift: start + shift + n]
        read_expert_bytes(self.ckpt, self.reader, job.layer, job.expert, dest, self.dtype,
                          None if self.direct else self.staging[worker])
        return n, 0

    def _in_place_shift(self, job, start: int) -> int:
        """Offset within the slot that puts the expert at the same address modulo 4 KiB as its file bytes.

        Direct IO then reads straight into the slot instead of through a bounce buffer (slots have
        4 KiB of slack for this). 0 when the expert is converted or the offset would misalign the dtype.
        """
        if self.host is not None or not self.ckpt.expert_is_packed(job.layer, job.expert, self.dtype):
            return 0
        shift = (self.ckpt.expert_infos(job.layer, job.expert)[0].offset - start) % ALIGN
        return shift if shift % self.dtype.itemsize == 0 else 0

    @property
    def bytes_disk_read(self) -> int:
        return (self.host or self.reader).bytes_disk_read         # the reader's own count (threads overlap)

    def nbytes(self) -> int:
        return self.buffer.numel() + sum(s.numel() for s in self.staging)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.host is not None:
            self.host.close()


def read_expert_bytes(ckpt, reader, layer: int, expert: int, dest: torch.Tensor, dtype: torch.dtype,
                      staging: torch.Tensor | None = None) -> None:
    """Read one expert's tensors from disk into `dest` (uint8), packed, in `dtype`.

    When the bytes on disk are not the packed buffer itself (another dtype, or a family whose
    experts are stored stacked, transposed or quantized: `ckpt.expert_is_packed`, decided per
    expert from every tensor's dtype), they go to `staging` first and `ckpt.pack_raw` converts them
    into `dest`. Sizes are checked: a checkpoint that does not match the plan fails. Then the
    files read are checked against what was loaded (`ckpt.check_unchanged`), also when a read fails.
    """
    infos = ckpt.expert_infos(layer, expert)
    raw = sum(i.nbytes for i in infos)
    direct = ckpt.expert_is_packed(layer, expert, dtype)
    if direct and raw != dest.numel():
        raise ExpertReadError(f"expert {expert} of layer {layer} has {raw} bytes in {infos[0].path}, "
                              f"expected {dest.numel()}; the checkpoint does not match config.json")
    target = dest if direct else (staging if staging is not None and staging.numel() >= raw
                                  else torch.empty(raw, dtype=torch.uint8))
    ranges, offset = [], 0
    for info in infos:
        ranges.append(_ops.ReadRange(info.path, info.offset, info.nbytes, target, offset))
        offset += info.nbytes
    what = f"expert {expert} of layer {layer}"
    try:
        reader.read(ranges)
    except ExpertReadError:
        ckpt.check_unchanged(infos, what)    # a file changed under us: say that, not only "short read"
        raise
    ckpt.check_unchanged(infos, what)
    if not direct:
        try:
            ckpt.pack_raw(layer, expert, target[:raw], dest, dtype)
        except (ValueError, RuntimeError) as e:
            raise ExpertReadError(f"expert {expert} of layer {layer} in {infos[0].path} cannot be converted to "
                                  f"the packed layout ({e}); the checkpoint does not match config.json") from None
