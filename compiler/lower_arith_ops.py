"""Lowering rules for arithmetic and lookup-table ops (Mul/Sub/Div/Add with constants and
broadcasting, ReduceMean, MatMul between activations, PRelu/LeakyRelu, Softmax, ArgMax and the
8-bit lookup tables): a mixin of ``compiler.lowering.Lowering``.

Each ``_lower_<op>`` method takes a LayerGroup and returns one IR Layer; see docs/ir.md for the
integer rule of each IR op.
"""
from __future__ import annotations


class ArithmeticOpLowering:
    """Per-op lowering methods for arithmetic and lookup-table ops (mixed into Lowering)."""
