"""moe-engine: run Hugging Face Mixture-of-Experts checkpoints whose experts do not fit in fast memory.

    import moe_engine
    eng = moe_engine.load("path/to/checkpoint")
    print(eng.generate("def fibonacci(n):", max_new_tokens=32))
"""
from .errors import (CheckpointError, ConfigError, MoeEngineError, PromptTooLongError, TokenizerError,
                     UnsupportedArchitectureError)
from .runtime.engine import Engine
from .distributed import load

__version__ = "0.1.0"
__all__ = ["load", "Engine", "MoeEngineError", "CheckpointError", "ConfigError", "TokenizerError",
           "PromptTooLongError", "UnsupportedArchitectureError", "__version__"]
