"""Checkpoint reading: config.json -> ModelSpec, safetensors index with per-tensor byte ranges, families."""
from .checkpoint import Checkpoint
from .families import FAMILIES, family_for, supported_architectures
from .safetensors_index import SafetensorsIndex, TensorInfo

__all__ = ["Checkpoint", "FAMILIES", "family_for", "supported_architectures", "SafetensorsIndex", "TensorInfo"]
