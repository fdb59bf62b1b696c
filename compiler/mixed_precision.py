"""Automatic mixed precision (``--auto-16bit``): keep the most sensitive layers in 16 bits.

Sensitivity of layer L: the output SQNR of the QDQ model in which L alone is 8-bit and every
other layer is 16-bit, against the float model, on (a few of) the calibration samples. A low
value means L alone already costs the output much; 16-bit layers elsewhere add next to no noise,
so the measure isolates L. Layers are then promoted to 16 bits, most sensitive first, one at a
time, each step measuring the whole model's output SQNR (8-bit except the promoted layers),
until the SQNR reaches ``target_db`` or ``max_layers`` layers are promoted.

Cost: one scale selection (~0.2 s on EfficientNet-Lite0) and one QDQ build and run per
candidate layer and per promotion, on ``samples`` samples. Every trial's table is the one the real
compile would use for that set of 16-bit layers (``choose_qparams`` with that preset, consumer
scales and nudges included): an earlier version mixed an all-8-bit and an all-16-bit table, which
dropped the Add inputs' effective scales (``QParamTable.consumer_scales``) and the re-chosen
encodings of layers reading a 16-bit input, and so promised 25.5 dB on EfficientNet-Lite0 for a
model that measured 7.9 dB.
Candidates: the integer weighted layers (``candidate_layers``); a promoted layer's weights and
output become 16-bit, and pass-through layers after it (MaxPool, Reshape) follow its output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np
import onnx
from onnx import version_converter

from passes.graph import opset_version
from passes.insert_qdq import InsertQDQ
from passes.layer_plan import LayerPlan
from passes.qparams import QParamTable
from passes.targets import TargetPreset

from .calibration import TensorRange
from .calibration_data import CalibrationSet
from .metrics import sqnr_db
from .onnx_runner import make_session
from .scales import choose_qparams


@dataclass
class MixedPrecision:
    """The outcome: the preset with its 16-bit layers, and what was measured on the way."""

    preset: TargetPreset
    promoted: list[str]
    sensitivity: dict[str, float]  # layer -> output SQNR (dB) with only that layer at 8 bits
    sqnr_8bit_db: float  # all layers 8-bit (plus any named 16-bit layers), calibration samples
    sqnr_db: float  # with the promoted layers, same samples
    target_db: float
    steps: list[tuple[str, float]] = field(default_factory=list)  # (layer promoted, SQNR after)
    seconds: float = 0.0

    def summary(self) -> str:
        if np.isnan(self.sqnr_db):
            return "auto-16bit: nothing to promote (the preset is already 16-bit or has no weighted layer)"
        met = "reached" if self.sqnr_db >= self.target_db else "not reached"
        names = ", ".join(self.promoted[:8]) + (", ..." if len(self.promoted) > 8 else "")
        return (f"auto-16bit: {len(self.promoted)} layer(s) promoted to 16 bits ({names or 'none'}); output SQNR "
                f"on calibration samples {self.sqnr_8bit_db:.2f} -> {self.sqnr_db:.2f} dB, target "
                f"{self.target_db:g} dB {met}; {self.seconds:.1f} s")


class _Scorer:
    """Output SQNR of a QDQ model against the float model, on fixed samples, for a set of 16-bit
    layers: the table is ``choose_qparams`` with exactly the preset the final compile uses, so a
    trial measures the model that will be compiled. The 16-bit opset conversion runs once."""

    def __init__(self, model: onnx.ModelProto, plan: LayerPlan, ranges: dict[str, TensorRange],
                 data: CalibrationSet, samples: int, preset: TargetPreset):
        self.plan = plan
        self.ranges = ranges
        self.preset = preset
        self.feeds = list(islice(data.batches(1), samples))
        self.outputs = [o.name for o in model.graph.output]
        session = make_session(model, optimize=False)
        self.reference = self._flat([session.run(self.outputs, f) for f in self.feeds])
        self.float_model = model
        self.model = model
        if opset_version(model) < 21:  # 16-bit Q/DQ needs opset 21: convert once, not per trial
            try:
                self.model = version_converter.convert_version(model, 21)
            except (RuntimeError, ValueError):
                self.model = model  # InsertQDQ converts (and reports a failure) per trial

    @staticmethod
    def _flat(runs: list[list[np.ndarray]]) -> np.ndarray:
        return np.concatenate([np.concatenate([np.asarray(o).reshape(-1) for o in run]) for run in runs])

    def table(self, wide_layers) -> QParamTable:
        """The compile's table with ``wide_layers`` (added to the preset's own) in 16 bits."""
        layers = tuple(self.preset.layers_16bit) + tuple(n for n in wide_layers if n not in self.preset.layers_16bit)
        return choose_qparams(self.float_model, self.plan, self.ranges, replace(self.preset, layers_16bit=layers))

    def __call__(self, table: QParamTable) -> float:
        session = make_session(InsertQDQ(self.plan, table)(self.model).model, optimize=False)
        return sqnr_db(self.reference, self._flat([session.run(self.outputs, f) for f in self.feeds]))


def candidate_layers(plan: LayerPlan) -> list[str]:
    """The integer weighted layers (Conv, Gemm, MatMul): where 16 bits buy both finer weights and
    a finer output. Add, pooling and table layers keep the preset's width."""
    return [g.name for g in plan.groups if getattr(g, "kind", "integer") == "integer" and g.weight is not None]


def choose_16bit_layers(model: onnx.ModelProto, plan: LayerPlan, ranges: dict[str, TensorRange],
                        preset: TargetPreset, data: CalibrationSet, target_db: float,
                        max_layers: int | None = None, samples: int = 8) -> MixedPrecision:
    """Rank layers by sensitivity and promote them to 16 bits (module docstring)."""
    start = time.perf_counter()
    fixed = tuple(preset.layers_16bit)
    candidates = [n for n in candidate_layers(plan) if n not in fixed]
    result = MixedPrecision(preset, [], {}, float("nan"), float("nan"), target_db)
    if preset.weight_bits != 8 or not candidates:
        result.seconds = time.perf_counter() - start
        return result
    score = _Scorer(model, plan, ranges, data, samples, preset)
    baseline = score(score.table(()))
    result.sqnr_8bit_db = result.sqnr_db = baseline
    if baseline >= target_db:
        result.seconds = time.perf_counter() - start
        return result
    for name in candidates:  # only ``name`` narrow, everything else wide
        result.sensitivity[name] = score(score.table([n for n in candidates if n != name]))
    ranking = sorted(candidates, key=lambda n: result.sensitivity[n])
    budget = len(ranking) if max_layers is None else min(max_layers, len(ranking))
    current = baseline
    for name in ranking[:budget]:
        result.promoted.append(name)
        current = score(score.table(result.promoted))
        result.steps.append((name, current))
        if current >= target_db:
            break
    result.preset = replace(preset, layers_16bit=fixed + tuple(result.promoted))
    result.sqnr_db = current
    result.seconds = time.perf_counter() - start
    return result
