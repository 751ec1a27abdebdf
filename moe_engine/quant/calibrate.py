"""The calibration run of mixed-precision quantization: what each expert sees and how much each width hurts.

    calibration text -> tokens -> the unquantized model (windows of up to 512 tokens)
        each MoE layer: tokens routed per expert, routing weight per expert, a sample of its inputs
    then per layer, per expert e, per candidate width b:
        error_e(b) = mean over the sampled inputs x of || ffn_e,b(x) - ffn_e(x) ||^2

The sample is uniform over the layer's calibration tokens (reservoir sampling with a fixed seed),
not only the tokens routed to e, so rarely used experts still get an error estimate; how much e
matters is carried by its importance (allocate.importance).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model.experts import ExpertLayout
from .format import QuantLayout

WINDOW = 512


@dataclass
class LayerStats:
    tokens: np.ndarray                  # [E] calibration tokens routed to each expert
    weights: np.ndarray                 # [E] routing weight summed per expert
    inputs: list = field(default_factory=list)   # sampled router inputs, float32 [D] each
    seen: int = 0


class CalibrationRecorder:
    """A routing observer that tallies routing and samples router inputs."""

    def __init__(self, moe_layers: list[int], num_experts: int, samples: int, seed: int = 0):
        self.stats = {m: LayerStats(np.zeros(num_experts), np.zeros(num_experts)) for m in moe_layers}
        self.samples = samples
        self.rng = np.random.default_rng(seed)

    def observe(self, layer, router_input, experts, weights) -> None:
        s = self.stats[layer]
        ids = experts.cpu().flatten().numpy()
        np.add.at(s.tokens, ids, 1)
        np.add.at(s.weights, ids, weights.float().cpu().flatten().numpy())
        x = router_input.float().cpu()
        for row in x:                                   # reservoir sample of the layer's inputs
            if len(s.inputs) < self.samples:
                s.inputs.append(row.clone())
            else:
                j = self.rng.integers(0, s.seen + 1)
                if j < self.samples:
                    s.inputs[j] = row.clone()
            s.seen += 1

    def begin_step(self, token_ids, seq_ids) -> None:
        """Calibration tallies whole windows: nothing to note per step."""


def calibration_tokens(engine, path, max_tokens: int) -> list[int]:
    if engine.tokenizer is None:
        raise ConfigError(f"--quant mixed needs a calibration run over text, and the model in "
                          f"{engine.checkpoint.model_dir} has no tokenizer files; add them or use --quant int8/int4")
    text = path.read_text(encoding="utf-8")
    ids = engine.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 64:
        raise ConfigError(f"--calibration {path} gives only {len(ids)} tokens; give at least a few thousand")
    return ids


def record_calibration(engine, path, max_tokens: int, samples: int, progress: bool = True) -> dict[int, LayerStats]:
    """Run the (unquantized) engine over the calibration text; per MoE layer routing tallies and input samples."""
    spec = engine.spec
    ids = calibration_tokens(engine, path, max_tokens)
    window = min(WINDOW, engine.max_context)
    rec = CalibrationRecorder(spec.moe_layers, spec.moe.num_experts, samples)
    with engine.observing(rec):
        for start in tqdm(range(0, len(ids), window), desc="calibrating", unit="window", disable=not progress,
                          leave=False):
            engine.logits(torch.tensor([ids[start:start + window]]))
    return rec.stats


def expert_errors(ckpt, layer: int, inputs: torch.Tensor, bits: tuple[int, ...], group: int,
                  act) -> np.ndarray:
    """[E, len(bits)] mean squared output error of each expert of `layer` quantized at each width."""
    spec = ckpt.spec
    dense = ExpertLayout.of(spec)
    d, i = spec.hidden_size, spec.moe.intermediate_size
    out = np.zeros((spec.moe.num_experts, len(bits)))
    for e in range(spec.moe.num_experts):
        packed = ckpt.read_expert(layer, e, torch.float32)
        ref = dense.ffn(inputs, packed, act)                                        # [S, D]
        sections = dense.sections(packed)                                           # gate, up, down (+ biases)
        for j, b in enumerate(bits):
            q = QuantLayout(d, i, b, group, dense.bias)
            y = q.ffn(inputs, q.quantize(*sections[:3], biases=sections[3:] or None), act)
            out[e, j] = (y - ref).square().sum(-1).mean().item()
    return out
