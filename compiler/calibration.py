"""Calibration: the value range of every tensor that needs one, measured by running the float model
in onnxruntime over the calibration set, batch by batch.

Two halves, as torch.ao.quantization's observers split collecting from computing:
- pure numpy observers with fixed-size state (``MinMaxObserver``, ``StreamingHistogram``,
  ``PercentileObserver``): ``update(x)`` folds a batch in and forgets it, ``range()`` computes;
- ``collect_ranges``: one onnxruntime session of a copy of the model whose graph outputs are the
  requested tensors, fed one batch at a time. Nothing is kept between batches but the observers'
  state, so memory does not grow with the number of samples.

onnxruntime runs with its default graph optimisations; a tensor that is a graph output is never
fused away, so every requested tensor is produced as the model defines it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import onnx
import onnxruntime as ort

from passes.graph import graph_input_names

from .calibration_data import CalibrationSet
from .errors import CompileError

METHODS = ("minmax", "percentile")


@dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one tensor, and the estimator that gave it."""

    min: float
    max: float
    method: str


# --------------------------------------------------------------------------- observers (pure numpy)


class MinMaxObserver:
    """Running minimum and maximum."""

    def __init__(self):
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{int(np.count_nonzero(~np.isfinite(x)))} non-finite value(s)")
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self.count += x.size

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("no values observed")
        return self.min, self.max


class StreamingHistogram:
    """Counts of all values seen, over the symmetric range [-R, R) in ``num_bins`` equal bins,
    plus the exact min, max and count.

    R is a power of two, set by the first batch to the smallest one above max|x|. When a later
    batch reaches R, R doubles (as often as needed) and neighbouring bins are merged pairwise into
    the centre half. With ``num_bins`` and R powers of two, bin width w = 2R/num_bins is a power
    of two, so a value's bin ``floor(x / w) + num_bins/2`` is computed exactly and
    ``floor(floor(x / w) / 2) = floor(x / 2w)``: the merged counts equal a histogram computed
    directly over the final range; nothing is re-read. Bins never straddle 0, so the bins of a
    non-negative tensor start at 0. Memory: ``num_bins`` int64 counts, whatever the data size.
    """

    def __init__(self, num_bins: int = 2048):
        if num_bins < 4 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 4, got {num_bins}")
        self.num_bins = num_bins
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.bound = 0.0  # R; 0 until the first non-empty batch
        self.min = math.inf
        self.max = -math.inf
        self.total = 0

    @property
    def bin_width(self) -> float:
        return 2.0 * self.bound / self.num_bins

    def edges(self) -> np.ndarray:
        """The num_bins + 1 bin edges, -R .. R."""
        return -self.bound + self.bin_width * np.arange(self.num_bins + 1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()  # exact for float32 (and integer) tensors
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{int(np.count_nonzero(~np.isfinite(x)))} non-finite value(s)")
        peak = max(-lo, hi)
        if self.bound == 0.0:
            self.bound = _power_of_two_above(peak)
        while peak >= self.bound:
            self._double()
        scale = self.num_bins / (2.0 * self.bound)  # 1/w, a power of two: x * scale is exact
        idx = np.floor(x * scale).astype(np.int64) + self.num_bins // 2
        self.counts += np.bincount(idx, minlength=self.num_bins)
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.total += x.size

    def _double(self) -> None:
        """R -> 2R: bins (2j, 2j+1) become bin num_bins/4 + j."""
        quarter = self.num_bins // 4
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.zeros_like(self.counts)
        self.counts[quarter:quarter + merged.size] = merged
        self.bound *= 2.0

    def percentile_range(self, p: float) -> tuple[float, float]:
        """The (100 - p)th and p-th percentiles, each rounded outwards to its bin's edge and kept
        within [min, max].

        With n values sorted as x_0 <= ... <= x_(n-1), h = (n - 1) p / 100 as numpy computes it:
        the upper end is the top edge of the bin holding x_ceil(h) (numpy's method="higher"), the
        lower end the bottom edge of the bin holding x_floor(h') for h' = (n - 1)(100 - p) / 100
        (method="lower"). So  higher <= hi <= higher + w  and  lower - w <= lo <= lower, with w
        the bin width (w < 4 max|x| / num_bins); a non-negative tensor gets lo >= 0.
        """
        if not 50.0 <= p <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {p}")
        if self.total == 0:
            raise ValueError("no values observed")
        last = self.total - 1
        rank_hi = min(last, int(np.ceil(last * (np.float64(p) / 100))))
        rank_lo = max(0, int(np.floor(last * ((100 - np.float64(p)) / 100))))
        cumulative = np.cumsum(self.counts)
        bin_hi = int(np.searchsorted(cumulative, rank_hi + 1))  # first bin with count > rank
        bin_lo = int(np.searchsorted(cumulative, rank_lo + 1))
        w = self.bin_width
        hi = min(-self.bound + (bin_hi + 1) * w, self.max)
        lo = max(-self.bound + bin_lo * w, self.min)
        return lo, hi


def _power_of_two_above(x: float) -> float:
    """The smallest power of two strictly greater than x >= 0 (2^-24 for 0)."""
    if x <= 0.0:
        return 2.0 ** -24
    _, exponent = math.frexp(x)  # x = m 2^e, 0.5 <= m < 1, so 2^(e-1) <= x < 2^e
    return math.ldexp(1.0, exponent)


class PercentileObserver:
    """A ``StreamingHistogram`` read out at the p-th and (100 - p)-th percentiles."""

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048):
        if not 50.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {percentile}")
        self.percentile = percentile
        self.histogram = StreamingHistogram(num_bins)

    def update(self, x: np.ndarray) -> None:
        self.histogram.update(x)

    def range(self) -> tuple[float, float]:
        return self.histogram.percentile_range(self.percentile)


Observer = Union[MinMaxObserver, PercentileObserver]


def make_observer_factory(method: str, percentile: float = 99.99,
                          num_bins: int = 2048) -> Callable[[], Observer]:
    """A function making a fresh observer for ``method``; checks the options once, up front."""
    if method == "minmax":
        return MinMaxObserver
    if method == "percentile":
        try:
            PercentileObserver(percentile, num_bins)
        except ValueError as e:
            raise CompileError(f"calibration method 'percentile': {e}") from None
        return lambda: PercentileObserver(percentile, num_bins)
    raise CompileError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")


# --------------------------------------------------------------------------- onnxruntime plumbing


def collect_ranges(model: onnx.ModelProto, tensor_names: list[str], data: CalibrationSet,
                   method: str = "minmax", percentile: float = 99.99, batch_size: int = 1,
                   num_bins: int = 2048) -> dict[str, TensorRange]:
    """The range of each named tensor (node outputs and graph inputs) over all calibration samples.

    ``method="minmax"``: running min and max. ``method="percentile"``: the (100 - percentile)th and
    percentile-th percentiles from a ``StreamingHistogram`` of ``num_bins`` bins. A batch of
    ``batch_size`` samples is run at a time (the model's batch axis is made symbolic for sizes
    above 1, so a model that hard-codes batch 1 inside, e.g. in a Reshape, needs batch_size=1).
    """
    new_observer = make_observer_factory(method, percentile, num_bins)
    names = list(dict.fromkeys(tensor_names))
    inputs = graph_input_names(model)
    if sorted(data.input_names) != sorted(inputs):
        raise CompileError(f"{data.origin} has inputs {data.input_names}, the model {inputs}")
    _check_names(model, names, inputs)
    from_feed = [n for n in names if n in inputs]
    from_run = [n for n in names if n not in inputs]
    session = _session_with_outputs(model, from_run, batch_size) if from_run else None

    observers = {n: new_observer() for n in names}
    first = 0
    for feeds in data.batches(batch_size):
        count = len(next(iter(feeds.values())))
        where = f"calibration samples {first}..{first + count - 1}"
        values = list(zip(from_feed, (feeds[n] for n in from_feed)))
        if session is not None:
            try:
                values += zip(from_run, session.run(from_run, feeds))
            except Exception as e:  # onnxruntime's own exception types are not public
                hint = " (try batch_size=1)" if batch_size > 1 else ""
                raise CompileError(f"onnxruntime failed on {where}{hint}: {e}") from None
        for name, value in values:
            try:
                observers[name].update(value)
            except ValueError as e:
                raise CompileError(f"tensor '{name}' on {where}: {e}; it cannot be quantized "
                                   f"(check the model and the calibration data)") from None
        del values, feeds  # the outputs of one batch are all that is ever held
        first += count

    ranges = {}
    for name in names:
        try:
            lo, hi = observers[name].range()
        except ValueError as e:
            raise CompileError(f"tensor '{name}': {e} (it is empty on every sample)") from None
        ranges[name] = TensorRange(lo, hi, method)
    return ranges


def _check_names(model: onnx.ModelProto, names: list[str], inputs: list[str]) -> None:
    produced = {out for node in model.graph.node for out in node.output if out}
    known = produced | set(inputs)
    constants = {i.name for i in model.graph.initializer}
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    consts = [n for n in unknown if n in constants]
    others = [n for n in unknown if n not in constants]
    parts = []
    if others:
        shown = ", ".join(f"'{n}'" for n in others[:10]) + (", ..." if len(others) > 10 else "")
        parts.append(f"no tensor named {shown} in model graph '{model.graph.name}' (not a node "
                     f"output nor a graph input)")
    if consts:
        parts.append(f"{', '.join(repr(n) for n in consts)} are initializers (constants): their "
                     f"ranges come from their values, not from calibration")
    raise CompileError("cannot calibrate: " + "; ".join(parts))


def _session_with_outputs(model: onnx.ModelProto, outputs: list[str],
                          batch_size: int) -> ort.InferenceSession:
    """One session of a copy of ``model`` whose graph outputs are exactly ``outputs``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types = _element_types(m)
    if batch_size > 1:
        # The samples' axis replaces the batch axis: make it symbolic, and drop recorded shapes
        # (they say batch 1) so that onnxruntime infers them again.
        for inp in m.graph.input:
            shape = inp.type.tensor_type.shape
            if len(shape.dim):
                shape.dim[0].Clear()
                shape.dim[0].dim_param = "calibration_batch"
        del m.graph.value_info[:]
    del m.graph.output[:]
    for name in outputs:
        vi = m.graph.output.add()
        vi.name = name
        if name in types:  # element type only: no shape to disagree with the batch size
            vi.type.tensor_type.elem_type = types[name]
    try:
        return ort.InferenceSession(m.SerializeToString(), ort.SessionOptions(),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CompileError(f"onnxruntime cannot load model graph '{model.graph.name}' for "
                           f"calibration: {e}") from None


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type the model records or shape inference finds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot handle still runs; types may be missing
        inferred = model
    types = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types
