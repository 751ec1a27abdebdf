"""Building the model's pieces: the decoder with its kernels, the expert cache, and the seam between them.

    build_decoder   construct on the meta device, validate shapes, allocate, fuse q|k|v where the decode
                    ops run, fill every non-expert weight, choose the matmul kernel and the decode ops;
                    with --quant-scope all, quantize the dense matmul weights (quant/dense.py)
    build_cache     every expert resident, or the offloading cache over the plan's slots (host tier and
                    hybrid cost model on a GPU; the predictor feed when prefetching)
    bind_experts    each MoE block's expert-compute strategy over the cache (model/expert_compute.py), and
                    the cache's routing observer registered first; once per decoder

Every choice is made here, once, from the configuration (config.py); nothing is swapped later.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .. import _ops
from .._ops.decode import decode_ops as make_decode_ops
from ..checkpoint import Checkpoint
from ..experts import ExpertCache, OffloadedExperts, ResidentExperts
from ..experts.costmodel import calibrate
from ..experts.host import HostTier
from ..experts.policies import make_policy
from ..model.decoder import Decoder
from ..model.expert_compute import ExpertLoop, FusedExperts, dense_ffn, flat_cpu
from ..quant.dense import DenseQuant, quantize_dense
from ..quant.kernels import quant_expert_ffn
from ..quant.settings import QuantSettings
from .config import KernelConfig, OffloadConfig
from .forecast import Forecaster
from .plugins import default_predictor


def non_expert_shapes(decoder: Decoder) -> dict[str, tuple[int, ...]]:
    """Generic name -> shape of every weight the decoder reads from the checkpoint."""
    skip = {"lm_head.weight"} if decoder.spec.tie_word_embeddings else set()
    return {n: tuple(t.shape) for n, t in decoder.state_dict().items() if n not in skip}


def build_decoder(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True,
                  kernels: KernelConfig | None = None, quant: QuantSettings | None = None) -> Decoder:
    """Validate the checkpoint against the spec, then load every non-expert weight in `dtype` (routers'
    correction biases in float32, see Decoder.cast). The experts are bound apart (bind_experts). With quant's
    scope "all" the dense matmul weights are then quantized (quant/dense.py) and their dense tensors dropped."""
    kernels = kernels or KernelConfig()
    with torch.device("meta"):
        decoder = Decoder(ckpt.spec).cast(dtype)
    shapes = non_expert_shapes(decoder)
    ckpt.validate(shapes)
    decoder = decoder.to_empty(device=device)
    decoder.tie_weights()
    ops = decode_ops(kernels, dtype, device)
    if ops is not None:
        decoder.fuse_qkv()                    # before reading: q, k and v land in the fused tensor's views
    params = decoder.state_dict()
    with torch.no_grad():
        for name in tqdm(shapes, desc="loading weights", unit="tensor", disable=not progress, leave=False):
            params[name].copy_(ckpt.read(name, params[name].dtype))
    decoder.init_rotary(device)
    decoder.set_linear_kernel(linear_kernel(kernels, dtype, device))
    decoder.set_decode_ops(ops)
    if quant is not None and quant.scope == "all":
        quantize_dense(decoder, quant.dense_bits, quant.group_size, kernels.quant, progress)
    return decoder.eval()


def linear_kernel(kernels: KernelConfig, dtype: torch.dtype, device: torch.device):
    """The matmul kernel the decoder's linear layers and experts use: moe_engine._C's bf16 GEMV (through
    _ops.bf16_linear, which hands prefill-sized inputs to torch) for a bf16 model on the CPU when the extension
    loaded, or its torch twin where it would run (kernels.linear == "reference"); None (F.linear) otherwise,
    so float32 and GPU models compute exactly as torch does."""
    if dtype != torch.bfloat16 or device.type != "cpu" or not _ops.HAS_C_EXT:
        return None
    return _ops.bf16_linear if kernels.linear == "auto" else _ops.bf16_linear_twin


def decode_ops(kernels: KernelConfig, dtype: torch.dtype, device: torch.device):
    """The fused one-token ops (_ops.decode.DecodeOps) for a bf16 model on the CPU when the extension loaded,
    the linear kernel is not the reference and decode ops are not switched off; else None."""
    if linear_kernel(kernels, dtype, device) is None or kernels.linear != "auto" or not kernels.decode_ops:
        return None
    return make_decode_ops()


def non_expert_bytes(ckpt: Checkpoint, dtype: torch.dtype, quant: QuantSettings | None = None) -> int:
    """Bytes of every non-expert weight in `dtype` (tied embeddings counted once), without reading any; with
    quant's scope "all", as the quantized dense matrices take them (quant/dense.DenseQuant)."""
    with torch.device("meta"):
        decoder = Decoder(ckpt.spec).cast(dtype)
    params = decoder.state_dict()
    total = sum(math.prod(shape) * params[n].element_size() for n, shape in non_expert_shapes(decoder).items())
    if quant is not None and quant.scope == "all":
        return DenseQuant.of(ckpt.spec, dtype, quant).non_expert_bytes(total)
    return total


def routers(decoder: Decoder) -> dict[int, torch.Tensor]:
    """Router weights [E, D] of every MoE layer, for predictors."""
    return {block.layer: block.router.weight for block in decoder.moe_blocks()}


def build_cache(experts, decoder: Decoder, plan, dtype: torch.dtype, device: torch.device, offload: OffloadConfig,
                predictor, progress: bool) -> ExpertCache:
    """All experts resident when no budget limits them; else the offloading cache over the plan's slots.
    experts: the checkpoint, or its quantized experts (quant/store.QuantizedExperts); dtype: how they are stored."""
    if plan is None or (plan.all_resident and device.type == "cpu"):
        return ResidentExperts(experts, dtype, device, progress)
    host = cost = None
    if device.type != "cpu":
        host = HostTier(experts, plan, dtype, device, offload.io_threads, pinned=True, progress=progress)
        cost = calibrate(experts.layout, decoder.embed.weight.dtype, device)    # activations in the model dtype
    forecaster = None
    if predictor is not None and offload.prefetch:
        moe = decoder.spec.moe
        forecaster = Forecaster(predictor, default_predictor, routers(decoder), moe.top_k, moe.num_experts)
    return OffloadedExperts(experts, plan, dtype, device, make_policy(offload.policy), forecaster,
                            io_threads=offload.io_threads, host=host, cost_model=cost)


def bind_experts(decoder: Decoder, cache: ExpertCache, layouts=None, quant_kernel: str = "auto") -> None:
    """Each MoE block's expert-compute strategy over `cache`, chosen once: the decode ops' fused call for SwiGLU
    experts without biases on the CPU (bf16, or quantized with the fast quant kernel), else the per-expert loop
    (with the quantized experts' per-expert layouts, `layouts(layer)`, when experts are quantized). The cache's
    routing observer is registered first."""
    if cache.observer is not None:
        decoder.observers.add(cache.observer)
    ops = decoder.decode_ops
    num_experts = decoder.spec.moe.num_experts
    strategies = {}
    for block in decoder.moe_blocks():
        lays = layouts(block.layer) if layouts is not None else None
        ffn = _quant_ffn(lays, block.act, quant_kernel) if lays is not None else dense_ffn(block.layout, block.act,
                                                                                             block.linear)
        loop = ExpertLoop(cache, num_experts, ffn)
        fusable = (ops is not None and not block.layout.bias and block.act in ("silu", "swish")
                   and decoder.embed.weight.dtype == torch.bfloat16
                   and (lays is None or (quant_kernel == "auto" and not any(lay.bias for lay in lays))))
        if not fusable:
            strategies[block.layer] = loop
        elif lays is None:
            strategies[block.layer] = FusedExperts(loop, _bf16_fused(ops, block.spec.intermediate_size),
                                                   flat_cpu(torch.bfloat16), ops.max_expert_tokens)
        else:
            strategies[block.layer] = FusedExperts(loop, _quant_fused(ops, lays, block.spec.intermediate_size),
                                                   flat_cpu(torch.uint8), ops.max_quant_expert_tokens)
    decoder.bind_experts(strategies)


def _bf16_fused(ops, inter: int):
    return lambda x, weights, ids, experts, packed, acc: ops.moe_experts(x, weights, ids, experts, packed, inter, acc)


def _quant_fused(ops, layouts, inter: int):
    """The fused call over quantized buffers: each expert's W1 and W2 as pointers into its buffer."""
    def fused(x, weights, ids, experts, packed, acc):
        ptrs = []
        for e, buf in zip(experts, packed):
            lay, base = layouts[e], buf.data_ptr()
            ptrs += (lay.w1.pointers(base), lay.w2.pointers(base))
        return ops.moe_experts_quant(x, weights, ids, experts, ptrs, inter, acc)
    return fused


def _quant_ffn(layouts, act, kernel: str):
    return lambda e, x, buf: quant_expert_ffn(x, buf, layouts[e], act, kernel)
