"""Next-token choice from logits: greedy argmax, or temperature -> top-k -> top-p -> multinomial.

Pipeline for one decode step (B rows, V vocabulary):

    logits [B, V] --greedy--> argmax                                   -> ids [B]
                  --sample--> / temperature -> top-k -> top-p -> softmax
                              -> multinomial with each row's own generator -> ids [B]

The filters match transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper
(min_tokens_to_keep=1), applied in that order. This module knows nothing of tokenizers or of
stopping; it takes logits and returns token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_engine.errors import ConfigError

_SEED_MOD = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy even when do_sample is True."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1 = disabled
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self):
        _check_do_sample(self.do_sample)
        object.__setattr__(self, "temperature", _check_temperature(self.temperature))
        _check_top_k(self.top_k)
        object.__setattr__(self, "top_p", _check_top_p(self.top_p))
        _check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_do_sample(value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"do_sample={value!r} is invalid: use True or False")


def _check_temperature(value) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"temperature={value!r} is invalid: use a value >= 0 (0 means greedy)")
    return float(value)


def _check_top_k(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"top_k={value!r} is invalid: use an integer >= 0 (0 disables top-k)")


def _check_top_p(value) -> float:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"top_p={value!r} is invalid: use a value in (0, 1] (1 disables top-p)")
    return float(value)


def _check_seed(value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"seed={value!r} is invalid: use an integer, or leave it unset for a random seed")


_CHECKS = {
    "do_sample": _check_do_sample,
    "temperature": _check_temperature,
    "top_k": _check_top_k,
    "top_p": _check_top_p,
}


def resolve_sampling(
    gen_defaults: dict | None,
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> SamplingParams:
    """Merge explicit arguments over the model's generation_config.json over SamplingParams defaults.

    Precedence per field: explicit argument (not None) > gen_defaults[key] (present and not None) >
    dataclass default. Keys read from gen_defaults: do_sample, temperature, top_k, top_p.

    do_sample follows transformers (greedy unless asked), with one deliberate difference: when
    do_sample is not given, gen_defaults has no do_sample, and the caller explicitly passes
    temperature > 0, we sample, because a vLLM / llama.cpp user who sets a temperature expects
    sampling. A do_sample present in gen_defaults (true or false) still wins over this inference.

    top_k: transformers falls back to 50 when generation_config.json has no top_k; we apply top_k
    only when gen_defaults holds it, so an absent key means no top-k filter.
    """
    defaults = {key: value for key, value in (gen_defaults or {}).items() if value is not None}
    explicit = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    values, from_file = {}, []
    for key, value in explicit.items():
        if value is not None:
            values[key] = value
        elif key in defaults:
            values[key] = defaults[key]
            from_file.append(key)
    if "do_sample" not in values:
        values["do_sample"] = _is_number(temperature) and temperature > 0
    return _build_params(values, seed, from_file)


def _build_params(values: dict, seed: int | None, from_file: list[str]) -> SamplingParams:
    for key in from_file:  # name the file when its value is the bad one
        try:
            _CHECKS[key](values[key])
        except ConfigError as err:
            raise ConfigError(f"{err} (read from generation_config.json; pass {key} explicitly to override)") from err
    return SamplingParams(**values, seed=seed)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, V] logits -> float32 logits divided by temperature (> 0)."""
    return logits.float() / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits, set the rest to -inf. [B, V] -> [B, V].

    k == 0 or k >= V leaves logits unchanged. Values tied with the k-th largest are kept, as in
    transformers' TopKLogitsWarper.
    """
    if k < 0:
        raise ConfigError(f"top_k={k!r} is invalid: use an integer >= 0 (0 disables top-k)")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep each row's smallest set of top tokens whose probability sums to >= p.

    [B, V] -> [B, V], removed tokens set to -inf; the most likely token is always kept; p == 1 leaves
    logits unchanged. A token is removed when the tokens ranked above it already reach p.
    """
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"top_p={p!r} is invalid: use a value in (0, 1] (1 disables top-p)")
    if p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V] each
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V] probability of higher-ranked tokens
    remove_sorted = mass_above >= p  # the top token has mass_above 0 < p: at least one is always kept
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling filters in transformers' order: temperature, top-k, top-p. [B, V] -> float32 [B, V]."""
    scores = apply_temperature(logits, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    return apply_top_p(scores, params.top_p)


class Sampler:
    """Chooses next tokens from logits [B, V] (float).

    One torch.Generator per row, seeded with params.seed + row index (nondeterministic when seed is
    None), so a row's tokens do not depend on the other rows of the batch or on how many there are.
    """

    def __init__(self, params: SamplingParams, batch_size: int, device: str | torch.device = "cpu"):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid: use an integer >= 1")
        self.params = params
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._generators = [self._make_generator(row) for row in range(batch_size)]

    def _make_generator(self, row: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if self.params.seed is None:
            generator.seed()
        else:
            generator.manual_seed((self.params.seed + row) % _SEED_MOD)
        return generator

    def __call__(self, logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """[R, V] logits -> LongTensor [R]. rows names the batch row of each logits row (default: all)."""
        rows = self._check_rows(logits, rows)
        if self.params.greedy:
            return torch.argmax(logits, dim=-1)
        probs = warp_logits(logits, self.params).softmax(dim=-1)  # [R, V]
        picks = [
            torch.multinomial(probs[i], 1, generator=self._generators[row])  # [1]
            for i, row in enumerate(rows)
        ]
        return torch.cat(picks)

    def _check_rows(self, logits: torch.Tensor, rows: list[int] | None) -> list[int]:
        if logits.dim() != 2:
            raise ValueError(f"logits have shape {tuple(logits.shape)}: expected [rows, vocab]")
        rows = list(range(self.batch_size)) if rows is None else list(rows)
        if len(rows) != logits.shape[0]:
            raise ValueError(
                f"logits have {logits.shape[0]} rows but rows names {len(rows)}: pass one row index per logits row"
            )
        bad = [row for row in rows if not 0 <= row < self.batch_size]
        if bad:
            raise ValueError(f"rows {bad} are outside this Sampler's batch of {self.batch_size}")
        if not self.params.greedy and logits.device.type != self.device.type:
            raise ValueError(
                f"logits are on {logits.device} but the Sampler's generators are on {self.device}: "
                f"build Sampler(..., device={str(logits.device)!r})"
            )
        return rows


__all__ = [
    "Sampler",
    "SamplingParams",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "resolve_sampling",
    "warp_logits",
]
