"""Checkpoint reading: config.json -> ModelSpec, tensors validated up front, read lazily.

    checkpoint.py        Checkpoint: non-expert tensors through safetensors, experts by byte range
    safetensors_index.py every tensor's byte range, from the headers (what direct-IO expert reads use)
    expert_format.py, mxfp4.py   experts stored otherwise (stacked, transposed, MXFP4) -> the packed layout
    families/            one small file per family mapping checkpoint names onto the generic decoder
"""
from .checkpoint import Checkpoint
from .families import FAMILIES, family_for, supported_architectures
from .safetensors_index import SafetensorsIndex, TensorInfo

__all__ = ["Checkpoint", "FAMILIES", "family_for", "supported_architectures", "SafetensorsIndex", "TensorInfo"]
