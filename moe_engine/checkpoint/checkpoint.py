"""A Hugging Face MoE checkpoint directory: config -> spec, tensors validated up front, read lazily.

Everything that can be checked without reading tensor data is checked in the constructor:
config.json, the architecture, the safetensors index and headers, and that every tensor the
decoder needs is present with the right shape. Non-expert tensors are read with the safetensors
library (`read`); experts are read one at a time, straight into a packed buffer, from byte ranges
known up front (`expert_infos`, our own index: the offloading tiers read those ranges with direct
IO); a family whose experts are stored otherwise (stacked, fused, quantized) converts them through
its ExpertFormat.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..model.experts import ExpertLayout
from ..model.spec import ModelSpec
from .expert_format import expert_slice, pack, split_raw
from .families import family_for
from .families.base import torch_dtype
from .safetensors_index import SafetensorsIndex, TensorInfo


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e}); fix or re-download the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def load_config(model_dir: Path):
    """config.json -> (family, transformers config). Errors name the file and the fix."""
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist or is not a directory")
    if not path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}: MODEL_DIR must be a Hugging Face checkpoint "
                              f"directory (config.json + *.safetensors)")
    raw = read_json(path, "config")
    family = family_for(raw.get("architectures"), raw.get("model_type"), str(path))
    from transformers import AutoConfig   # configs only: transformers parses and fills defaults
    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:   # transformers raises many kinds; surface it as one clear line
        raise CheckpointError(f"{path}: transformers cannot parse this config ({type(e).__name__}: {e})") from None
    return family, cfg


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.family, self.config = load_config(self.model_dir)
        self.spec: ModelSpec = self.family.build_spec(self.config)
        gen_path = self.model_dir / "generation_config.json"
        self.generation_config: dict = read_json(gen_path, "generation config") if gen_path.is_file() else {}
        self.index = SafetensorsIndex(self.model_dir)
        self.layout = ExpertLayout.of(self.spec)
        self.expert_format = self.family.expert_format_for(self.config)
        self._raw_packed: dict[torch.dtype, bool] = {}     # raw_is_packed per dtype
        self._files: dict[str, object] = {}                # path -> safetensors handle (non-expert reads)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.spec.dtype) if self.spec.dtype in ("float32", "float16", "bfloat16") else torch.float32

    # ---- validation --------------------------------------------------------------------------
    def validate(self, non_expert_shapes: dict[str, tuple[int, ...]]) -> None:
        """Check every needed tensor exists with the expected shape; name the first one that does not."""
        for generic, shape in non_expert_shapes.items():
            fused = self.family.fused_source(generic)
            if fused is None:
                self._check(self.family.checkpoint_name(generic), shape)
            else:
                name, _, parts = fused
                self._check(name, (shape[0] * parts, *shape[1:]))
        fmt = self.expert_format
        for layer in self.spec.moe_layers:
            for template, shape, dtype, stacked in fmt.expected(self.spec):
                experts = [0] if stacked else range(self.spec.moe.num_experts)
                for e in experts:
                    name = template.format(l=layer, e=e)
                    self._check(name, shape)
                    found = self.index.info(name).dtype
                    if dtype is not None and found != dtype:
                        raise CheckpointError(f"tensor {name} is {found}, expected {dtype} for experts stored as "
                                              f"{fmt.description or 'this family describes'}; the checkpoint "
                                              f"and config.json do not match")

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.index:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.model_dir} "
                                  f"(expected shape {list(shape)} for a {self.family.name} model as config.json "
                                  f"describes it); the checkpoint and config.json do not match")
        found = self.index.info(name)
        if tuple(found.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} in {Path(found.path).name} has shape {list(found.shape)}, "
                                  f"expected {list(shape)} from config.json; the checkpoint and config.json "
                                  f"do not match")

    # ---- reading -----------------------------------------------------------------------------
    def read(self, generic: str, dtype: torch.dtype) -> torch.Tensor:
        """One non-expert tensor by its generic decoder name, converted to `dtype` (read with safetensors)."""
        fused = self.family.fused_source(generic)
        if fused is None:
            name = self.family.checkpoint_name(generic)
            return self._open(name).get_tensor(name).to(dtype)
        name, part, parts = fused
        rows = self.index.info(name).shape[0] // parts                   # a fused tensor: only this part's rows
        return self._open(name).get_slice(name)[part * rows:(part + 1) * rows].to(dtype)

    def _open(self, name: str):
        """The safetensors file holding tensor `name`, opened once (its header was validated by the index)."""
        path = self.index.info(name).path
        if path not in self._files:
            self._files[path] = safe_open(path, framework="pt", device="cpu")
        return self._files[path]

    def expert_infos(self, layer: int, expert: int) -> tuple[TensorInfo, ...]:
        """Byte ranges (file, offset, nbytes) of one expert's tensors, in the order of its ExpertFormat."""
        fmt = self.expert_format
        return tuple(expert_slice(self.index.info(fmt.tensor_name(j, layer, expert)), expert) if fmt.stacked(j)
                     else self.index.info(fmt.tensor_name(j, layer, expert)) for j in range(len(fmt.names)))

    def expert_nbytes(self) -> int:
        """Bytes of one expert on disk (all its tensors)."""
        layer = self.spec.moe_layers[0]
        return sum(info.nbytes for info in self.expert_infos(layer, 0))

    def raw_is_packed(self, dtype: torch.dtype) -> bool:
        """True when an expert's bytes on disk, back to back, are its packed buffer in `dtype` (read in place)."""
        if dtype not in self._raw_packed:
            infos = self.expert_infos(self.spec.moe_layers[0], 0)
            self._raw_packed[dtype] = self.expert_format.to_sections is None and all(i.dtype == dtype for i in infos)
        return self._raw_packed[dtype]

    def pack_raw(self, layer: int, expert: int, raw: torch.Tensor, dest: torch.Tensor, dtype: torch.dtype) -> None:
        """Convert one expert's raw bytes (uint8, its tensors back to back) into its packed buffer `dest` (uint8)."""
        infos = self.expert_infos(layer, expert)
        pack(self.expert_format, self.spec, self.layout, split_raw(raw, infos), dest.view(dtype))

    def read_expert(self, layer: int, expert: int, dtype: torch.dtype, out: torch.Tensor | None = None):
        """Packed buffer of one expert in `dtype` (written into `out` when given)."""
        if out is None:
            out = torch.empty(self.layout.numel, dtype=dtype)
        infos = self.expert_infos(layer, expert)
        if not self.raw_is_packed(dtype):
            pack(self.expert_format, self.spec, self.layout, [self.index.read_info(i) for i in infos], out)
            return out
        offset = 0
        for info in infos:
            n = info.nbytes // info.dtype.itemsize
            self.index.read_info(info, out=out[offset:offset + n].view(info.shape))
            offset += n
        return out

    def close(self) -> None:
        self._files.clear()
        self.index.close()
