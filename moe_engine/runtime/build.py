"""Build the decoder from a checkpoint: construct on the meta device, validate shapes, fill weights."""
from __future__ import annotations

import math
import os

import torch
from tqdm.auto import tqdm

from .. import _ops
from ..checkpoint import Checkpoint
from ..model.decoder import Decoder


def non_expert_shapes(decoder: Decoder) -> dict[str, tuple[int, ...]]:
    """Generic name -> shape of every weight the decoder reads from the checkpoint."""
    skip = {"lm_head.weight"} if decoder.spec.tie_word_embeddings else set()
    return {n: tuple(t.shape) for n, t in decoder.state_dict().items() if n not in skip}


def build_decoder(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True) -> Decoder:
    """Validate the checkpoint against the spec, then load every non-expert weight in `dtype` (routers'
    correction biases in float32, see Decoder.cast)."""
    with torch.device("meta"):
        decoder = Decoder(ckpt.spec).cast(dtype)
    shapes = non_expert_shapes(decoder)
    ckpt.validate(shapes)
    decoder = decoder.to_empty(device=device)
    decoder.tie_weights()
    params = decoder.state_dict()
    with torch.no_grad():
        for name in tqdm(shapes, desc="loading weights", unit="tensor", disable=not progress, leave=False):
            params[name].copy_(ckpt.read(name, params[name].dtype))
    decoder.init_rotary(device)
    decoder.set_linear_kernel(linear_kernel(dtype, device))
    decoder.set_decode_ops(decode_ops(dtype, device))
    return decoder.eval()


def linear_kernel(dtype: torch.dtype, device: torch.device):
    """The matmul kernel the decoder's linear layers and experts use: moe_engine._C's bf16 GEMV (through
    _ops.bf16_linear, which hands prefill-sized inputs to torch) for a bf16 model on the CPU when the extension
    loaded; None (F.linear) otherwise, so float32 and GPU models compute exactly as torch does."""
    if dtype == torch.bfloat16 and device.type == "cpu" and _ops.HAS_C_EXT:
        return _ops.bf16_linear
    return None


def decode_ops(dtype: torch.dtype, device: torch.device):
    """The fused one-token ops (_ops.decode.DecodeOps) for a bf16 model on the CPU when the extension loaded and
    MOE_ENGINE_LINEAR_KERNEL is not "reference" (the test hook that runs the torch code everywhere); else None."""
    if linear_kernel(dtype, device) is None or os.environ.get(_ops.LINEAR_KERNEL_ENV) == "reference":
        return None
    from .._ops.decode import decode_ops as make
    return make()


def non_expert_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes of every non-expert weight in `dtype` (tied embeddings counted once), without reading any."""
    with torch.device("meta"):
        decoder = Decoder(ckpt.spec).cast(dtype)
    params = decoder.state_dict()
    return sum(math.prod(shape) * params[n].element_size() for n, shape in non_expert_shapes(decoder).items())


def routers(decoder: Decoder) -> dict[int, torch.Tensor]:
    """Router weights [E, D] of every MoE layer, for predictors."""
    return {i: layer.moe.router.weight for i, layer in enumerate(decoder.layers) if getattr(layer, "moe", None)}


def set_expert_layouts(decoder: Decoder, experts) -> None:
    """Quantized experts: tell each MoE block how each of its experts is stored (widths may differ)."""
    for i, layer in enumerate(decoder.layers):
        if getattr(layer, "moe", None) is not None:
            layer.moe.expert_layouts = experts.layouts(i)


def build_provider(ckpt: Checkpoint, decoder: Decoder, plan, dtype: torch.dtype, device: torch.device,
                   policy: str, predictor, prefetch: bool, io_threads: int, progress: bool):
    """All experts resident when no budget limits them; else the offloading cache over the plan's slots."""
    from ..experts import OffloadedExperts, ResidentExperts
    from ..experts.policies import make_policy
    if plan is None or (plan.all_resident and device.type == "cpu"):
        return ResidentExperts(ckpt, dtype, device, progress)
    host = cost = None
    if device.type != "cpu":
        from ..experts.costmodel import calibrate
        from ..experts.host import HostTier
        host = HostTier(ckpt, plan, dtype, device, io_threads, pinned=True, progress=progress)
        cost = calibrate(ckpt.layout, decoder.embed.weight.dtype, device)    # activations in the model dtype
    forecaster = None
    if predictor is not None and prefetch:
        from .forecast import Forecaster
        from .plugins import default_predictor
        moe = ckpt.spec.moe
        forecaster = Forecaster(predictor, default_predictor, routers(decoder), moe.top_k, moe.num_experts)
    return OffloadedExperts(ckpt, plan, dtype, device, make_policy(policy), forecaster,
                            io_threads=io_threads, host=host, cost_model=cost)
