"""Lowering of float-fallback layers (dequantize -> float op -> quantize): a mixin of
``compiler.lowering.Lowering``. See docs/ir.md, "float layers".
"""
from __future__ import annotations


class FloatFallbackLowering:
    """Lowering of nodes that run in float on the host (mixed into Lowering)."""
