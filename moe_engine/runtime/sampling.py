"""Next-token choice from logits: greedy argmax, or temperature -> top-k -> top-p -> min-p -> multinomial.

Pipeline for one decode step (B rows, V vocabulary):

    logits [B, V] --(per sequence: logits_process.py: allowed ids, min_tokens, logit_bias, penalties, grammar)
                  --greedy--> argmax                                                -> ids [B]
                  --sample--> / temperature -> top-k -> top-p -> min-p -> softmax
                              -> multinomial with each row's own generator          -> ids [B]

The filters match transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and
MinPLogitsWarper (min_tokens_to_keep=1), applied in that order (transformers' order; vLLM applies min-p
before top-k / top-p). SamplingParams also carries what the per-sequence processors and the logprobs need;
this module knows nothing of tokenizers or of stopping; it takes logits and returns token ids.
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
    min_p: float = 0.0  # 0 = disabled; keep tokens with probability >= min_p * the top token's
    repetition_penalty: float = 1.0  # 1 = off; transformers' / vLLM's (prompt and generated tokens)
    presence_penalty: float = 0.0  # OpenAI's, on generated tokens: - presence if the token occurred
    frequency_penalty: float = 0.0  # OpenAI's, on generated tokens: - frequency * occurrences
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); a dict is accepted
    allowed_token_ids: tuple[int, ...] | None = None  # only these ids may be generated
    min_tokens: int = 0  # eos / stop ids are masked and stops ignored until this many tokens are generated
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self):
        _check_do_sample(self.do_sample)
        object.__setattr__(self, "temperature", _check_temperature(self.temperature))
        _check_top_k(self.top_k)
        object.__setattr__(self, "top_p", _check_top_p(self.top_p))
        _check_seed(self.seed)
        object.__setattr__(self, "min_p", _check_range(self.min_p, "min_p", 0.0, 1.0, "0 disables min-p"))
        object.__setattr__(self, "repetition_penalty", _check_repetition(self.repetition_penalty))
        for name in ("presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _check_range(getattr(self, name), name, -2.0, 2.0, "0 disables it"))
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        object.__setattr__(self, "allowed_token_ids", _check_ids(self.allowed_token_ids, "allowed_token_ids"))
        _check_count(self.min_tokens, "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_count(getattr(self, name), name)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def processes(self) -> bool:
        """True when logits are changed per sequence before the choice (logits_process.py)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.allowed_token_ids is not None or self.min_tokens)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the params must exist in the model's vocabulary."""
        ids = [i for i, _ in self.logit_bias] + list(self.allowed_token_ids or ())
        bad = [i for i in ids if i >= vocab_size]
        if bad:
            name = "logit_bias" if bad[0] in dict(self.logit_bias) else "allowed_token_ids"
            raise ConfigError(f"{name} names token id {bad[0]}, outside the vocabulary 0..{vocab_size - 1}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_do_sample(value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"do_sample={value!r} is invalid: use True or False")


MIN_TEMPERATURE = 1e-2  # below it logits / temperature overflow float32 (vLLM clamps to the same bound)


def _check_temperature(value) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"temperature={value!r} is invalid: use a value >= 0 (0 means greedy)")
    if 0 < value < MIN_TEMPERATURE:
        raise ConfigError(f"temperature={value!r} is too small to sample with: use 0 for greedy or a value >= "
                          f"{MIN_TEMPERATURE}")
    return float(value)


def _check_range(value, name: str, low: float, high: float, off: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name}={value!r} is invalid: use a value in [{low:g}, {high:g}] ({off})")
    return float(value)


def _check_repetition(value) -> float:
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= 100:
        raise ConfigError(f"repetition_penalty={value!r} is invalid: use a value in (0, 100] (1 disables it)")
    return float(value)


def _check_count(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name}={value!r} is invalid: use an integer >= 0")


def _check_ids(value, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if not items or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in items):
        raise ConfigError(f"{name}={value!r} is invalid: use a non-empty list of token ids (integers >= 0)")
    return tuple(sorted(set(items)))


def _check_logit_bias(value) -> tuple[tuple[int, float], ...]:
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, (list, tuple)):
        raise ConfigError(f"logit_bias={value!r} is invalid: use a mapping of token id to a bias in [-100, 100]")
    out = {}
    for pair in pairs:
        key, bias = pair if isinstance(pair, (list, tuple)) and len(pair) == 2 else (pair, None)
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ConfigError(f"logit_bias key {key!r} is invalid: keys are token ids (integers >= 0)")
        out[token] = _check_range(bias, f"logit_bias[{key!r}]", -100.0, 100.0, "added to the token's logit")
    return tuple(sorted(out.items()))


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
    "min_p": lambda v: _check_range(v, "min_p", 0.0, 1.0, "0 disables min-p"),
    "repetition_penalty": _check_repetition,
}


def resolve_sampling(
    gen_defaults: dict | None,
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    **extra,
) -> SamplingParams:
    """Merge explicit arguments over the model's generation_config.json over SamplingParams defaults.

    Precedence per field: explicit argument (not None) > gen_defaults[key] (present and not None) >
    dataclass default. Keys read from gen_defaults: do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty (as transformers and vLLM read them). `extra`: the other SamplingParams fields
    (presence_penalty, frequency_penalty, logit_bias, allowed_token_ids, min_tokens, logprobs,
    prompt_logprobs), taken as given when not None.

    do_sample follows transformers (greedy unless asked), with one deliberate difference: when
    do_sample is not given, gen_defaults has no do_sample, and the caller explicitly passes
    temperature > 0, we sample, because a vLLM / llama.cpp user who sets a temperature expects
    sampling. A do_sample present in gen_defaults (true or false) still wins over this inference.

    top_k: transformers falls back to 50 when generation_config.json has no top_k; we apply top_k
    only when gen_defaults holds it, so an absent key means no top-k filter.
    """
    defaults = {key: value for key, value in (gen_defaults or {}).items() if value is not None}
    explicit = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "min_p": min_p, "repetition_penalty": repetition_penalty}
    values, from_file = {}, []
    for key, value in explicit.items():
        if value is not None:
            values[key] = value
        elif key in defaults:
            values[key] = defaults[key]
            from_file.append(key)
    if "do_sample" not in values:
        values["do_sample"] = _is_number(temperature) and temperature > 0
    unknown = sorted(set(extra) - _EXTRA)
    if unknown:
        raise ConfigError(f"unknown sampling argument {unknown[0]!r}: use one of {', '.join(sorted(_EXTRA))}")
    values.update({key: value for key, value in extra.items() if value is not None})
    return _build_params(values, seed, from_file)


_EXTRA = {"presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids", "min_tokens", "logprobs",
          "prompt_logprobs"}


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
    remove_sorted = mass_above >= p
    remove_sorted[..., 0] = False  # the top token is always kept (a p below float32's range compares as 0)
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p times the row's top probability; the rest -inf. [B, V] -> [B, V].

    min_p == 0 leaves logits unchanged; the top token is always kept (transformers' MinPLogitsWarper).
    """
    if min_p == 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)  # [B, 1]
    remove = probs < min_p * top
    remove.scatter_(-1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling filters in transformers' order: temperature, top-k, top-p, min-p. [B, V] -> float32 [B, V]."""
    scores = apply_temperature(logits, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    return apply_min_p(scores, params.min_p)


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

    def generator(self, row: int) -> torch.Generator:
        """Row's own generator (speculative verification draws with it too)."""
        return self._generators[row]

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
    "apply_min_p",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "resolve_sampling",
    "warp_logits",
]
