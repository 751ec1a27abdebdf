"""Batch scheduling and token rescheduling over plain ids (never imports moe_engine).

The scheduler lands with the server issue; the package exists now so the installed layout is stable.
"""
