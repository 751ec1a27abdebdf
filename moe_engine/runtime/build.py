"""Build the decoder from a checkpoint: construct on the meta device, validate shapes, fill weights."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint
from ..model.decoder import Decoder


def non_expert_shapes(decoder: Decoder) -> dict[str, tuple[int, ...]]:
    """Generic name -> shape of every weight the decoder reads from the checkpoint."""
    skip = {"lm_head.weight"} if decoder.spec.tie_word_embeddings else set()
    return {n: tuple(t.shape) for n, t in decoder.state_dict().items() if n not in skip}


def build_decoder(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True) -> Decoder:
    """Validate the checkpoint against the spec, then load every non-expert weight in `dtype`."""
    with torch.device("meta"):
        decoder = Decoder(ckpt.spec).to(dtype)
    shapes = non_expert_shapes(decoder)
    ckpt.validate(shapes)
    decoder = decoder.to_empty(device=device)
    decoder.tie_weights()
    params = decoder.state_dict()
    with torch.no_grad():
        for name in tqdm(shapes, desc="loading weights", unit="tensor", disable=not progress, leave=False):
            params[name].copy_(ckpt.read(name, dtype))
    decoder.init_rotary(device)
    return decoder.eval()
