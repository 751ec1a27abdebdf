"""Profiling: routing traces, Belady's bound and trace replays through the engine's own cache policy code."""
