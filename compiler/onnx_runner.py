"""Running ONNX models in onnxruntime over stacked samples (the float model and the QDQ model)."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort


def make_session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    """A CPU session; ``optimize=False`` disables graph optimizations, so a QDQ model runs as its
    float emulation of Q/DQ (DESIGN.md: what "the runtime matches the QDQ model" means)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_samples(session: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]],
                outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run batch after batch and stack every output along axis 0."""
    names = outputs or [o.name for o in session.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in batches:
        for name, value in zip(names, session.run(names, feeds)):
            collected[name].append(value)
    return {n: np.concatenate(v, axis=0) for n, v in collected.items()}
