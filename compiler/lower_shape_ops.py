"""Lowering rules for data-movement ops (Transpose, Squeeze/Unsqueeze, Slice/Split, Pad,
DepthToSpace/SpaceToDepth, Resize/Upsample, ConvTranspose): a mixin of ``compiler.lowering.Lowering``.

Each ``_lower_<op>`` method takes a LayerGroup and returns one IR Layer; see docs/ir.md for the
integer rule of each IR op.
"""
from __future__ import annotations


class ShapeOpLowering:
    """Per-op lowering methods for data-movement ops (mixed into Lowering)."""
