"""Registry of supported model families (one small module each)."""
from __future__ import annotations

from ...errors import UnsupportedArchitectureError
from . import deepseek_v2, deepseek_v3, gpt_oss, granitemoe, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe
from .base import Family

FAMILIES: tuple[Family, ...] = (mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, deepseek_v2.FAMILY,
                                deepseek_v3.FAMILY, phimoe.FAMILY, gpt_oss.FAMILY, granitemoe.FAMILY)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for(architectures: list[str] | None, model_type: str | None, config_path: str) -> Family:
    """Pick the family by config.json's "architectures" (then "model_type"); else a clear error."""
    for fam in FAMILIES:
        if set(architectures or ()) & set(fam.architectures):
            return fam
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    found = ", ".join(architectures or []) or f"model_type={model_type!r}"
    raise UnsupportedArchitectureError(
        f"{config_path}: architecture {found} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}")
