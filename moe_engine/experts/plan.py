"""Placement plan: how the memory budgets split into non-expert weights, KV cache and expert slots.

Tiers (docs/architecture.md): the compute device holds non-expert weights, the KV cache reserve and
a fixed number of expert slots (`--gpu-mem`); host RAM holds packed experts for a GPU to copy
from (`--cpu-mem`); the checkpoint on disk holds everything. With no GPU the CPU computes, its
slots are the RAM experts that compute reads, and misses are read from disk into them.

This module only does arithmetic and prints the plan; it allocates nothing. A budget too small
for the non-expert weights, the KV reserve and `top_k` slots per MoE layer fails here, before
any weight is read, with the smallest budget that would work. A budget that `--gpu-mem auto`
chose from the memory available (runtime/resources.py) arrives with the sentence saying how,
which the plan prints (and the error names); `notes` are further lines (runtime footprint, threads).

The runtime's own footprint (python, torch, tokenizer, shared libraries: the RSS measured just before the
plan, `runtime_bytes`) is not part of `--gpu-mem` on the CPU (nor of `--cpu-mem` on a GPU): the plan says
so and states the total the process will need: footprint + RUNTIME_GROWTH (what the process adds once it
computes: code pages of the kernels, thread stacks) + what it places.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import format_size
from ..errors import ConfigError
from ..model.experts import ExpertLayout
from ..model.spec import ModelSpec
from .policies import layer_quotas

ALIGN = 4096                     # slot stride alignment (direct IO wants 4 KiB-aligned buffers)
IO_CHUNK = 4 << 20               # bytes of one bounce buffer of the direct-IO reader, per thread
DEFAULT_KV_TOKENS = 4096         # KV reserve when the caller names none: one sequence of this many tokens
WORKSPACE_TOKENS = 64            # activation workspace estimate: a prefill chunk of this many tokens
RUNTIME_GROWTH = 24 << 20        # RSS the runtime adds after the plan as it starts computing (kernel code pages,
                                 # thread stacks): 14-16 MiB measured on x86-64 Linux with torch 2.13


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer; MLA counts its compressed latent (ModelSpec.kv_dims)."""
    heads, k_dim, v_dim = spec.kv_dims
    return spec.num_layers * heads * (k_dim + v_dim) * dtype.itemsize


@dataclass(frozen=True)
class Placement:
    """What sits where. Bytes are exact for weights and slots, estimates for workspace."""

    device: str
    num_moe_layers: int
    num_experts: int                 # per MoE layer
    expert_bytes: int                # one packed expert in the compute dtype
    slot_bytes: int                  # its slot stride (aligned, with 4 KiB slack for in-place direct IO)
    non_expert_bytes: int
    kv_tokens: int
    kv_bytes: int
    io_bytes: int                    # staging + bounce buffers of the loaders
    device_budget: int | None
    host_budget: int | None
    device_slots: int                # expert slots on the compute tier (all layers)
    host_slots: int                  # packed experts held in host RAM (GPU only; 0 on CPU)
    quotas: list[int] = field(default_factory=list)   # [num_layers] device slots per layer
    expert_lines: tuple[str, ...] = ()                 # how experts are stored (quantization), for describe()
    device_auto: str | None = None   # how --gpu-mem auto chose device_budget (resources.AutoBudget.describe())
    host_auto: str | None = None     # how --cpu-mem auto chose host_budget
    notes: tuple[str, ...] = ()      # what else was measured and chosen: runtime footprint, compute threads
    runtime_bytes: int | None = None  # RSS measured before anything was placed (the runtime's footprint)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def process_bytes(self) -> int | None:
        """Host RAM the process will hold: the runtime footprint + the compute tier (CPU) or the host tier (GPU)."""
        if self.runtime_bytes is None:
            return None
        placed = self.device_bytes if self.device == "cpu" else self.host_slots * self.slot_bytes + self.io_bytes
        return self.runtime_bytes + RUNTIME_GROWTH + placed

    def _process_line(self) -> str:
        tier, flag = ("compute tier", "--gpu-mem") if self.device == "cpu" else ("host tier", "--cpu-mem")
        placed = self.process_bytes - self.runtime_bytes - RUNTIME_GROWTH
        auto = self.device_auto if self.device == "cpu" else self.host_auto
        return (f"  process: runtime footprint {format_size(self.runtime_bytes)} (measured) + "
                f"{format_size(RUNTIME_GROWTH)} once it computes + {tier} {format_size(placed)} = about "
                f"{format_size(self.process_bytes)} of RAM; {flag} bounds the {tier} "
                f"only and does not include the runtime footprint"
                + (" (auto measured what is available after it)" if auto else ""))

    @property
    def all_resident(self) -> bool:
        return self.device_slots >= self.total_experts

    @property
    def device_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_bytes + self.io_bytes + self.device_slots * self.slot_bytes

    def describe(self) -> str:
        """The plan as printed at start: device, bytes and experts per tier, slots per layer."""
        e, total = self.expert_bytes, self.total_experts
        lines = [(f"placement plan ({self.device}; {total} experts of {'up to ' if self.expert_lines else ''}"
                  f"{format_size(e)} in {self.num_moe_layers} MoE layers, {format_size(total * e)} in all)"),
                 *self.expert_lines,
                 *([f"  memory: {self.device_auto}; experts get "
                    f"{format_size(self.device_slots * self.slot_bytes)} ({self.device_slots} slots)"]
                   if self.device_auto else []),
                 *([f"  memory: {self.host_auto}; host tier {self.host_slots} experts"] if self.host_auto else []),
                 *(f"  {note}" for note in self.notes),
                 f"  compute tier ({self.device}): non-expert weights {format_size(self.non_expert_bytes)}, "
                 f"KV reserve {format_size(self.kv_bytes)} ({self.kv_tokens} tokens), IO buffers "
                 f"{format_size(self.io_bytes)}, {self.device_slots} expert slots "
                 f"{format_size(self.device_slots * self.slot_bytes)} = {format_size(self.device_bytes)}"
                 + (f" of --gpu-mem {'auto = ' if self.device_auto else ''}{format_size(self.device_budget)}"
                    if self.device_budget else "")]
        if self.runtime_bytes is not None:
            lines.append(self._process_line())
        if self.device == "cpu":
            lines.append("  host tier: none (the CPU computes; misses are read from disk into its slots)")
        else:
            lines.append(f"  host tier (RAM): {self.host_slots} experts {format_size(self.host_slots * self.slot_bytes)}"
                         + (f" of --cpu-mem {'auto = ' if self.host_auto else ''}{format_size(self.host_budget)}"
                            if self.host_budget else ""))
        on_disk_only = total - max(self.device_slots, self.host_slots)
        where = "the quantized-expert cache" if self.expert_lines else "checkpoint"
        lines.append(f"  disk: {total} experts ({where}); {max(on_disk_only, 0)} reachable only from disk")
        if self.all_resident:
            lines.append("  slots per layer: all experts resident")
        else:
            lines.append("  slots per layer: " + " ".join(str(q) for q in self.quotas))
        return "\n".join(lines)


def _min_device_bytes(fixed: int, min_slots: int, slot_bytes: int) -> int:
    return fixed + min_slots * slot_bytes


def make_plan(spec: ModelSpec, device: torch.device, dtype: torch.dtype, non_expert_bytes: int,
              device_budget: int | None, host_budget: int | None, kv_tokens: int | None = None,
              io_threads: int = 2, staging_experts: int = 0, quota_weights: list[float] | None = None,
              expert_bytes: int | None = None, expert_lines: tuple[str, ...] = (), device_auto: str | None = None,
              host_auto: str | None = None, notes: tuple[str, ...] = (), runtime_bytes: int | None = None) -> Placement:
    """Split the budgets. `staging_experts`: expert-sized staging buffers the loader needs (dtype conversion).

    `expert_bytes`: bytes of the largest stored expert when experts are quantized (slots are sized
    for it); by default one expert in `dtype`. `expert_lines` describe the stored experts.
    `device_auto` / `host_auto`: how "auto" chose the budget ("--gpu-mem auto: ... -> 1.00 GiB"), printed
    and named in the error when it is too small; `notes`: more lines for describe(); `runtime_bytes`: the
    process's RSS before anything is placed, for the plan's process total.
    """
    moe = spec.moe
    n_layers = len(spec.moe_layers)
    expert_bytes = expert_bytes or ExpertLayout.of(spec).nbytes(dtype)
    slot_bytes = round_up(expert_bytes) + ALIGN
    kv_tokens = kv_tokens or min(spec.max_position_embeddings, DEFAULT_KV_TOKENS)
    kv_bytes = kv_tokens * kv_bytes_per_token(spec, dtype)
    workspace = WORKSPACE_TOKENS * spec.hidden_size * 4 * max(8, moe.top_k * 3)
    io_bytes = io_threads * IO_CHUNK + staging_experts * slot_bytes
    fixed = non_expert_bytes + kv_bytes + io_bytes + workspace
    total = n_layers * moe.num_experts
    min_slots = n_layers * moe.top_k
    if device_budget is None:
        slots = total
    else:
        need = _min_device_bytes(fixed, min_slots, slot_bytes)
        if device_budget < need and device_auto:
            raise ConfigError(
                f"{device_auto}, less than the {format_size(need)} this model needs on {device.type} (non-expert "
                f"weights {format_size(non_expert_bytes)} + KV reserve {format_size(kv_bytes)} ({kv_tokens} tokens) "
                f"+ IO buffers and workspace {format_size(io_bytes + workspace)} + {moe.top_k} expert slots per MoE "
                f"layer ({min_slots} x {format_size(expert_bytes)})); free memory, lower --max-kv-tokens, "
                + ("quantize the dense weights too (--quant-scope all)" if expert_lines else
                   "quantize the experts (--quant int4)")
                + f" or give {device_auto.split()[0]} a size")
        if device_budget < need:
            raise ConfigError(
                f"--gpu-mem {format_size(device_budget)} is too small for this model on {device.type}: non-expert "
                f"weights {format_size(non_expert_bytes)} + KV reserve {format_size(kv_bytes)} ({kv_tokens} tokens) "
                f"+ IO buffers {format_size(io_bytes)} + workspace {format_size(workspace)} + {moe.top_k} expert "
                f"slots per MoE layer ({min_slots} x {format_size(expert_bytes)}) need at least {format_size(need)} "
                f"({need} bytes); raise --gpu-mem to at least that")
        slots = min(total, (device_budget - fixed) // slot_bytes)
    host_slots = 0
    if device.type != "cpu":
        host_slots = total if host_budget is None else min(total, max(0, host_budget - io_bytes) // slot_bytes)
    quotas = [0] * spec.num_layers
    if slots >= total:
        for layer in spec.moe_layers:
            quotas[layer] = moe.num_experts
    else:
        per_moe = layer_quotas(slots, quota_weights or [1.0] * n_layers, moe.top_k, moe.num_experts)
        for layer, q in zip(spec.moe_layers, per_moe):
            quotas[layer] = q
    return Placement(device.type, n_layers, moe.num_experts, expert_bytes, slot_bytes, non_expert_bytes,
                     kv_tokens, kv_bytes, io_bytes + workspace, device_budget, host_budget,
                     sum(quotas), host_slots, quotas, tuple(expert_lines), device_auto, host_auto, tuple(notes),
                     runtime_bytes)
