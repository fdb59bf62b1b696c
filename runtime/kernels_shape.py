"""Reference integer kernels for data-movement IR ops (see docs/ir.md). numpy only.

Registered into ``runtime.kernels_reference.KERNELS`` (and so into the fast set too).
"""
from __future__ import annotations

KERNELS: dict = {}
