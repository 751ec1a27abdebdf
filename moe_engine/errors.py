"""Errors a user can act on: each message says what was found, what was expected, and what to change."""


class MoeEngineError(Exception):
    """Base class for every error moe-engine raises on purpose."""


class CheckpointError(MoeEngineError, ValueError):
    """A model directory, config.json, index or safetensors file is missing, unreadable or inconsistent."""


class UnsupportedArchitectureError(CheckpointError):
    """config.json names an architecture that no family mapping handles."""


class ConfigError(MoeEngineError, ValueError):
    """A flag or argument value is out of range (sampling values, sizes, devices)."""


class TokenizerError(MoeEngineError, ValueError):
    """Text input or chat was asked for but the model directory has no usable tokenizer."""


class PromptTooLongError(MoeEngineError, ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class ExpertReadError(MoeEngineError):
    """Reading expert bytes from a file failed; the message names the file, offset, bytes expected and got."""
