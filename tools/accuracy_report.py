"""Accuracy and speed of qlower on the builder's models (and any ONNX model given), per target.

Prints one table: compile time, output SQNR vs the float model for the integer runtime and for
the QDQ model (onnxruntime, optimizations off), per-layer mismatches against the QDQ model (each a
verified rounding tie), and latency per sample of the runtime beside onnxruntime float, all from
the same run.

    python -m tools.accuracy_report                       # the builder's models
    python -m tools.accuracy_report --model M.onnx --calib C.npz --eval E.npz
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from compiler.api import compile_model
from compiler.calibration_data import load_calibration
from compiler.evaluate import evaluate
from compiler.verify import check_layers
from tools import model_zoo


def measure(name: str, model, calib, evaluation, target: str) -> dict:
    start = time.perf_counter()
    result = compile_model(model, target, calib)
    compile_s = time.perf_counter() - start
    data = load_calibration(evaluation, result.input_specs)
    ev = evaluate(result, data, batch_size=1)
    first = next(data.batches(1))
    checks = check_layers(result, first)
    return {"model": name, "target": target, "compile_s": compile_s, "runtime_db": ev.runtime_sqnr_db,
            "qdq_db": ev.qdq_sqnr_db, "top1": ev.runtime_top1, "mismatch": sum(c.mismatches for c in checks),
            "unexcused": sum(c.unexcused for c in checks), "elements": sum(c.elements for c in checks),
            "ort_ms": ev.float_ms_per_sample, "ours_ms": ev.runtime_ms_per_sample}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--calib")
    parser.add_argument("--eval")
    parser.add_argument("--targets", default="mmav2,mmav1")
    parser.add_argument("--samples", type=int, default=32, help="builder models: calibration and evaluation samples")
    args = parser.parse_args(argv)
    cases = []
    if args.model:
        cases.append((os.path.basename(args.model), args.model, args.calib, args.eval))
    else:
        for name, build in model_zoo.MODELS.items():
            model = build()
            cases.append((name, model, model_zoo.calibration_samples(model, args.samples, seed=0),
                          model_zoo.calibration_samples(model, args.samples, seed=1)))
    print(f"machine: {os.cpu_count()} cores, numpy {np.__version__}")
    header = (f"{'model':<22} {'target':<6} {'compile s':>9} {'runtime dB':>10} {'QDQ dB':>7} {'top-1':>6} "
              f"{'layer mismatches (ties)':>24} {'ORT float ms':>12} {'qlower ms':>9}")
    print(header)
    print("-" * len(header))
    for name, model, calib, evaluation in cases:
        for target in args.targets.split(","):
            r = measure(name, model, calib, evaluation, target)
            ties = f"{r['mismatch']}/{r['elements']} ({r['mismatch'] - r['unexcused']} ties)"
            print(f"{r['model']:<22} {r['target']:<6} {r['compile_s']:9.2f} {r['runtime_db']:10.2f} {r['qdq_db']:7.2f} "
                  f"{r['top1']:6.1%} {ties:>24} {r['ort_ms']:12.2f} {r['ours_ms']:9.2f}")


if __name__ == "__main__":
    main()
