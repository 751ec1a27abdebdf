"""A Hugging Face MoE checkpoint directory: config -> spec, tensors validated up front, read lazily.

Everything that can be checked without reading tensor data is checked up front: config.json (types,
ranges and relations of its fields, one line naming the field), the architecture, the safetensors index
and headers (byte ranges inside their files and disjoint), and (`validate`) that every tensor the decoder
needs is present with the right shape and a float dtype, and that no layer beyond num_hidden_layers is
left unused. Non-expert tensors are read with the safetensors library (`read`); experts are read one
at a time, straight into a packed buffer, from byte ranges known up front (`expert_infos`, our own
index: the offloading tiers read those ranges with direct IO); a family whose experts are stored
otherwise (stacked, fused, quantized) converts them through its ExpertFormat.

Whether an expert's bytes are read as they are or converted is decided per expert from the dtype of
every one of its tensors (`expert_is_packed`): a checkpoint may store some tensors in another float
dtype (legal safetensors), and those experts are converted like transformers converts them at load.
Every read is followed by a check that the file is still the one indexed (`check_unchanged`, watch.py).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..model.experts import ExpertLayout
from ..model.spec import ModelSpec
from .expert_format import expert_slice, pack, split_raw
from .families import family_for
from .families.base import check_config, check_raw_config, torch_dtype
from .safetensors_index import SafetensorsIndex, TensorInfo

log = logging.getLogger("moe_engine")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # converted exactly as transformers does
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
    bad = check_raw_config(raw)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad}")
    from transformers import AutoConfig   # configs only: transformers parses and fills defaults
    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:   # transformers raises many kinds; surface it as one clear line
        why = " ".join(str(e).split())
        raise CheckpointError(f"{path}: transformers cannot parse this config ({type(e).__name__}: {why})") from None
    bad = check_config(cfg, family)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad}")
    return family, cfg


def build_spec(family, cfg, path: Path) -> ModelSpec:
    """The family's spec of a checked config; what the spec itself refuses becomes one line naming config.json."""
    try:
        return family.build_spec(cfg)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        why = " ".join(str(e).split())
        raise CheckpointError(f"{path}: this {family.name} config cannot describe a model ({why})") from None


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.family, self.config = load_config(self.model_dir)
        self.spec: ModelSpec = build_spec(self.family, self.config, self.model_dir / "config.json")
        gen_path = self.model_dir / "generation_config.json"
        self.generation_config: dict = read_json(gen_path, "generation config") if gen_path.is_file() else {}
        self.index = SafetensorsIndex(self.model_dir)
        self.layout = ExpertLayout.of(self.spec)
        self.expert_format = self.family.expert_format_for(self.config)
        self._unpacked: dict[torch.dtype, frozenset] = {}  # per dtype: (layer, expert) whose bytes need converting
        self._files: dict[str, object] = {}                # path -> safetensors handle (non-expert reads)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.spec.dtype) if self.spec.dtype in ("float32", "float16", "bfloat16") else torch.float32

    # ---- validation --------------------------------------------------------------------------
    def validate(self, non_expert_shapes: dict[str, tuple[int, ...]]) -> None:
        """Check every needed tensor exists with the expected shape and dtype; name the first one that does not.
        Then the tensors nothing reads: layers beyond num_hidden_layers fail, anything else is logged."""
        used = set()
        for generic, shape in non_expert_shapes.items():
            fused = self.family.fused_source(generic)
            if fused is None:
                name = self.family.checkpoint_name(generic)
                self._check(name, shape)
            else:
                name, _, parts = fused
                self._check(name, (shape[0] * parts, *shape[1:]))
            used.add(name)
        fmt = self.expert_format
        for layer in self.spec.moe_layers:
            for template, shape, dtype, stacked in fmt.expected(self.spec):
                experts = [0] if stacked else range(self.spec.moe.num_experts)
                for e in experts:
                    name = template.format(l=layer, e=e)
                    self._check(name, shape, float_only=dtype is None)
                    used.add(name)
                    found = self.index.info(name).dtype
                    if dtype is not None and found != dtype:
                        raise CheckpointError(f"tensor {name} is {found}, expected {dtype} for experts stored as "
                                              f"{fmt.description or 'this family describes'}; the checkpoint "
                                              f"and config.json do not match")
        self._check_unused(used)

    def _check_unused(self, used: set[str]) -> None:
        """Tensors of layers >= num_hidden_layers (beyond DeepSeek-V3's multi-token-prediction layers, which
        transformers skips too) mean config.json describes fewer layers than the checkpoint holds: fail. Other
        unused tensors (rotary tables, a tied lm_head, ...) are named in a warning."""
        layers = self.spec.num_layers
        spare = getattr(self.config, "num_nextn_predict_layers", 0) or 0
        unused = sorted(set(self.index.names()) - used)
        beyond = [n for n in unused if (m := _LAYER.search(n)) and int(m.group(1)) >= layers]
        extra = [n for n in beyond if int(_LAYER.search(n).group(1)) >= layers + spare]
        if extra:
            top = max(int(_LAYER.search(n).group(1)) for n in extra)
            span = f"layer {top}" if top == layers + spare else f"layers {layers + spare}..{top}"
            raise CheckpointError(f"config.json says num_hidden_layers={layers}, but the checkpoint in "
                                  f"{self.model_dir} holds {len(extra)} tensors of {span} "
                                  f"(e.g. {extra[0]}) that would be silently left out; set num_hidden_layers "
                                  f"to {top + 1 - spare} in config.json (or use the checkpoint it was written for)")
        other = [n for n in unused if n not in beyond and not n.endswith("rotary_emb.inv_freq")]
        if other:
            log.warning("%d tensors of the checkpoint in %s are not used by a %s model as config.json describes it: "
                        "%s%s", len(other), self.model_dir, self.family.name, ", ".join(other[:5]),
                        f" (+{len(other) - 5} more)" if len(other) > 5 else "")

    def _check(self, name: str, shape: tuple[int, ...], float_only: bool = True) -> None:
        if name not in self.index:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.model_dir} "
                                  f"(expected shape {list(shape)} for a {self.family.name} model as config.json "
                                  f"describes it); the checkpoint and config.json do not match")
        found = self.index.info(name)
        if tuple(found.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} in {Path(found.path).name} has shape {list(found.shape)}, "
                                  f"expected {list(shape)} from config.json; the checkpoint and config.json "
                                  f"do not match")
        if float_only and found.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} in {Path(found.path).name} is {found.dtype}; weights must be "
                                  f"float32, float16, bfloat16 or float64 (quantized or integer weights need a "
                                  f"quantization_config this family supports); the checkpoint is not one this "
                                  f"engine can read")

    # ---- reading -----------------------------------------------------------------------------
    def read(self, generic: str, dtype: torch.dtype) -> torch.Tensor:
        """One non-expert tensor by its generic decoder name, converted to `dtype` (read with safetensors)."""
        fused = self.family.fused_source(generic)
        if fused is None:
            name = self.family.checkpoint_name(generic)
            out = self._open(name).get_tensor(name).to(dtype)
            self.check_unchanged((self.index.info(name),))
            return out
        name, part, parts = fused
        rows = self.index.info(name).shape[0] // parts                   # a fused tensor: only this part's rows
        out = self._open(name).get_slice(name)[part * rows:(part + 1) * rows].to(dtype)
        self.check_unchanged((self.index.info(name),))
        return out

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

    def _needs_converting(self, dtype: torch.dtype) -> frozenset:
        """(layer, expert) of every expert with a tensor not stored in `dtype` (from every tensor's header dtype)."""
        if dtype not in self._unpacked:
            self._unpacked[dtype] = frozenset(
                (m, e) for m in self.spec.moe_layers for e in range(self.spec.moe.num_experts)
                if any(i.dtype != dtype for i in self.expert_infos(m, e)))
        return self._unpacked[dtype]

    def expert_is_packed(self, layer: int, expert: int, dtype: torch.dtype) -> bool:
        """True when this expert's bytes on disk, back to back, are its packed buffer in `dtype` (read in place);
        False: they are read into a staging buffer and converted (`pack_raw`)."""
        return self.expert_format.to_sections is None and (layer, expert) not in self._needs_converting(dtype)

    def raw_is_packed(self, dtype: torch.dtype) -> bool:
        """True when every expert is read in place in `dtype` (no staging buffers needed)."""
        return self.expert_format.to_sections is None and not self._needs_converting(dtype)

    def check_unchanged(self, infos, reading: str = "") -> None:
        """Raise CheckpointError when a file of `infos` changed since it was indexed (after reading from it)."""
        self.index.watch.check({i.path for i in infos}, reading or ", ".join(repr(i.name) for i in infos))

    def pack_raw(self, layer: int, expert: int, raw: torch.Tensor, dest: torch.Tensor, dtype: torch.dtype) -> None:
        """Convert one expert's raw bytes (uint8, its tensors back to back) into its packed buffer `dest` (uint8)."""
        infos = self.expert_infos(layer, expert)
        pack(self.expert_format, self.spec, self.layout, split_raw(raw, infos), dest.view(dtype))

    def read_expert(self, layer: int, expert: int, dtype: torch.dtype, out: torch.Tensor | None = None):
        """Packed buffer of one expert in `dtype` (written into `out` when given)."""
        if out is None:
            out = torch.empty(self.layout.numel, dtype=dtype)
        infos = self.expert_infos(layer, expert)
        if not self.expert_is_packed(layer, expert, dtype):
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
