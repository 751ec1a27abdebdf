"""Recording routing traces (`moe-engine trace`) in the npz format of docs/architecture.md.

    Engine.generate(prompt) --> decoder --begin_step / observe--> RoutingRecorder (one of the engine's observers)
                                                                     | per step: token ids, seq ids,
                                                                     | experts, weights (router inputs)
                                                                     v
                                             rows regrouped by sequence, in the order they were fed

One row per token fed through the model (prompt tokens, then each generated token except the
last, which is never fed). Extra arrays: `prompt_len` int32 [S], `moe_layers` int32 [L] (decoder
index of each trace layer) and, when asked, `router_inputs` float16 [T, L, D].
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .trace import Trace


class RoutingRecorder:
    """A routing observer that writes down what every MoE layer chose."""

    def __init__(self, moe_layers: list[int], router_inputs: bool = False):
        self.moe_layers = list(moe_layers)
        self.keep_inputs = router_inputs
        self.steps: list[dict] = []

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        self.steps.append({"tokens": token_ids.cpu(), "seqs": seq_ids.cpu(), "experts": {}, "weights": {}, "x": {}})

    def observe(self, layer, router_input, experts, weights) -> None:
        step = self.steps[-1]
        step["experts"][layer] = experts.cpu()
        step["weights"][layer] = weights.float().cpu()
        if self.keep_inputs:
            step["x"][layer] = router_input.to(torch.float16).cpu()

    def trace(self, prompt_lens: list[int], num_experts: int) -> Trace:
        """All recorded steps regrouped per sequence (sequences in order of first appearance)."""
        steps = [s for s in self.steps if s["experts"]]
        seqs = torch.cat([s["seqs"] for s in steps]).numpy()
        cat = {"tokens": torch.cat([s["tokens"] for s in steps]).numpy()}
        cat["experts"] = np.stack([torch.cat([s["experts"][m] for s in steps]).numpy() for m in self.moe_layers], 1)
        cat["probs"] = np.stack([torch.cat([s["weights"][m] for s in steps]).numpy() for m in self.moe_layers], 1)
        if self.keep_inputs:
            cat["x"] = np.stack([torch.cat([s["x"][m] for s in steps]).numpy() for m in self.moe_layers], 1)
        order_of_seq = {s: i for i, s in enumerate(dict.fromkeys(seqs.tolist()))}
        rank = np.array([order_of_seq[s] for s in seqs.tolist()], dtype=np.int64)
        order = np.argsort(rank, kind="stable")                  # by sequence, then by the order fed
        counts = np.bincount(rank, minlength=len(order_of_seq))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        id_dtype = np.uint8 if num_experts <= 256 else np.int16
        extra = {"prompt_len": np.asarray(prompt_lens, dtype=np.int32),
                 "moe_layers": np.asarray(self.moe_layers, dtype=np.int32)}
        if self.keep_inputs:
            extra["router_inputs"] = cat["x"][order]
        return Trace(cat["experts"][order].astype(id_dtype), cat["probs"][order].astype(np.float16), offsets,
                     cat["tokens"][order].astype(np.int32), extra, num_experts)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (a string, or an object with "prompt" or "text", per line) or one per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file (give a text file with one prompt per line, or .jsonl)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--prompts {path}: line {i} is not JSON ({e.msg})") from None
        text = item if isinstance(item, str) else (item.get("prompt") or item.get("text")) \
            if isinstance(item, dict) else None
        if not isinstance(text, str) or not text:
            raise ConfigError(f"--prompts {path}: line {i} needs a string or an object with a \"prompt\" or "
                              f"\"text\" string")
        prompts.append(text)
    return prompts


def record_trace(engine, prompts: list, max_new_tokens: int = 32, router_inputs: bool = False,
                 progress: bool = True, **generate_kw) -> Trace:
    """Generate each prompt (str or list of token ids) alone and return the routing of every token fed."""
    if not prompts:
        raise ConfigError("no prompts to trace: give at least one")
    spec = engine.spec
    recorder = RoutingRecorder(spec.moe_layers, router_inputs)
    lens = []
    with engine.observing(recorder):
        for p in tqdm(prompts, desc="tracing", unit="prompt", disable=not progress, leave=False):
            ids = torch.tensor(p) if not isinstance(p, str) else torch.tensor(engine.encode(p))
            lens.append(int(ids.numel()))
            engine.generate(ids, max_new_tokens=max_new_tokens, **generate_kw)
    return recorder.trace(lens, spec.moe.num_experts)
