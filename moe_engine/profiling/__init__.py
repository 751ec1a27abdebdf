"""Profiling: routing traces, Belady's bound, trace replays through the engine's own cache policy code, moe-lrc
metrics, and `moe-engine profile` (profile.py: run + collect; report.py: tables; plot.py: the figure)."""
