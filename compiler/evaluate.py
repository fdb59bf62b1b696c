"""Accuracy of a compiled program on evaluation data: the IR runtime and the QDQ model (both in
the same run) against the float model in onnxruntime."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .metrics import sqnr_db, top1_agreement
from .onnx_runner import make_session, run_samples


@dataclass
class Evaluation:
    num_samples: int
    runtime_sqnr_db: float
    qdq_sqnr_db: float
    runtime_vs_qdq_sqnr_db: float
    runtime_top1: float
    qdq_top1: float
    float_ms_per_sample: float
    runtime_ms_per_sample: float

    def text(self) -> str:
        return "\n".join([
            f"accuracy on {self.num_samples} evaluation samples (output SQNR vs the float model in onnxruntime):",
            f"  integer program (qlower runtime): {self.runtime_sqnr_db:6.2f} dB   top-1 agreement {self.runtime_top1:6.1%}",
            f"  QDQ model (onnxruntime):          {self.qdq_sqnr_db:6.2f} dB   top-1 agreement {self.qdq_top1:6.1%}",
            f"  integer program vs QDQ model:     {self.runtime_vs_qdq_sqnr_db:6.2f} dB",
            (f"  latency per sample: onnxruntime float {self.float_ms_per_sample:.2f} ms, "
             f"qlower runtime {self.runtime_ms_per_sample:.2f} ms"),
        ])


def _flat(outputs: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([outputs[n].reshape(len(outputs[n]), -1) for n in names], axis=1)


def evaluate(result, data, batch_size: int = 8) -> Evaluation:
    """Run float model, QDQ model and IR program on ``data`` (a CalibrationSet) and compare."""
    names = list(result.program.outputs)
    start = time.perf_counter()
    reference = run_samples(make_session(result.source_model, optimize=True), data.batches(1), names)
    float_seconds = time.perf_counter() - start
    qdq = run_samples(make_session(result.qdq_model, optimize=False), data.batches(1), names)
    start = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in data.batches(batch_size):
        out = result.program.run(feeds)
        for n in names:
            parts[n].append(out[n])
    runtime_seconds = time.perf_counter() - start
    ours = {n: np.concatenate(v) for n, v in parts.items()}
    ref, q, r = _flat(reference, names), _flat(qdq, names), _flat(ours, names)
    n = data.num_samples
    return Evaluation(n, sqnr_db(ref, r), sqnr_db(ref, q), sqnr_db(q, r),
                      top1_agreement(ref, r), top1_agreement(ref, q),
                      1000 * float_seconds / n, 1000 * runtime_seconds / n)
