"""Accuracy and speed of qlower on the builder's models (and any ONNX model given), per target
configuration.

Prints one table: compile time, output SQNR vs the float model for the integer runtime and for
the QDQ model (onnxruntime, optimizations off), the largest weight-scale nudge (TIDL's 8-bit
multiplier) and the most weight bits any layer lost to an int16 bias, per-layer mismatches against
the QDQ model on one sample (each a verified rounding tie), and latency per sample of the runtime
beside onnxruntime float, all from the same run.

Configurations (``--configs``, comma-separated; default all):
    mmav2-m8       mmav2 8-bit, TIDL's 8-bit multiplier (the default)
    mmav2-m31      mmav2 8-bit, 31-bit multiplier
    mmav1-b16      mmav1 8-bit, int16 bias (TDA4VM; the default)
    mmav1-b32      mmav1 8-bit, int32 bias
    mmav1-dwpc     mmav1 8-bit, int16 bias, per-channel (power-of-2) depthwise weights
    mmav2-16bit    mmav2 16-bit
    mmav1-16bit    mmav1 16-bit
    mmav2-dw16     mmav2 8-bit with the first depthwise conv in 16 bits
    mmav1-dw16     mmav1 8-bit with the first depthwise conv in 16 bits

    python -m tools.accuracy_report                       # the builder's models
    python -m tools.accuracy_report --efficientnet        # and ../shared/data/efficientnet_lite0.onnx
    python -m tools.accuracy_report --model M.onnx --calib C.npz --eval E.npz [--samples 32]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from compiler.api import compile_model
from compiler.calibration_data import load_calibration
from compiler.evaluate import evaluate
from compiler.verify import check_layers
from tools import model_zoo

CONFIGS: dict[str, tuple[str, dict]] = {
    "mmav2-m8": ("mmav2", {}),
    "mmav2-m31": ("mmav2", {"multiplier_bits": 31}),
    "mmav1-b16": ("mmav1", {"bias_bits": 16}),
    "mmav1-b32": ("mmav1", {"bias_bits": 32}),
    "mmav1-dwpc": ("mmav1", {"depthwise_per_channel": True}),
    "mmav2-16bit": ("mmav2", {"bits": 16}),
    "mmav1-16bit": ("mmav1", {"bits": 16}),
    "mmav2-dw16": ("mmav2", {"layers_16bit": "first-depthwise"}),
    "mmav1-dw16": ("mmav1", {"layers_16bit": "first-depthwise"}),
}

EFFICIENTNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "efficientnet_lite0.onnx"


def first_depthwise(result) -> str:
    """The name of the first depthwise conv (group > 1, one input channel per group) of a plan."""
    index_constant = result.float_model.graph.initializer
    shapes = {i.name: tuple(i.dims) for i in index_constant}
    for group in result.plan.groups:
        attrs = {a.name: a.i for a in group.node.attribute if a.name == "group"}
        if group.op_type == "Conv" and attrs.get("group", 1) > 1 and shapes.get(group.weight, (0, 0))[1] == 1:
            return group.name
    raise ValueError("the model has no depthwise conv")


def measure(name: str, model, calib, evaluation, config: str, depthwise: str | None = None) -> dict:
    target, options = CONFIGS[config]
    options = dict(options)
    if options.get("layers_16bit") == "first-depthwise":
        options["layers_16bit"] = [depthwise] if depthwise else []
    start = time.perf_counter()
    result = compile_model(model, target, calib, **options)
    compile_s = time.perf_counter() - start
    data = load_calibration(evaluation, result.input_specs)
    ev = evaluate(result, data, batch_size=8)
    first = next(data.batches(1))
    checks = check_layers(result, first)
    return {"model": name, "config": config, "compile_s": compile_s, "runtime_db": ev.runtime_sqnr_db,
            "qdq_db": ev.qdq_sqnr_db, "top1": ev.runtime_top1, "mismatch": sum(c.mismatches for c in checks),
            "unexcused": sum(c.unexcused for c in checks), "elements": sum(c.elements for c in checks),
            "nudge": result.qparams.largest("nudge"), "bias_bits_lost": result.qparams.largest("bias_fit"),
            "ort_ms": ev.float_ms_per_sample, "ours_ms": ev.runtime_ms_per_sample, "result": result}


def _first(arrays: str, n: int) -> dict[str, np.ndarray]:
    with np.load(arrays, allow_pickle=False) as data:
        return {k: data[k][:n] for k in data.files}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--calib")
    parser.add_argument("--eval")
    parser.add_argument("--efficientnet", action="store_true", help=f"also {EFFICIENTNET} with its _calib/_eval.npz")
    parser.add_argument("--no-zoo", action="store_true", help="skip the builder's models")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--samples", type=int, default=32, help="calibration and evaluation samples per model")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    cases = []
    if args.model:
        cases.append((os.path.basename(args.model), args.model, _first(args.calib, args.samples),
                      _first(args.eval, args.samples)))
    elif not args.no_zoo:
        for name, build in model_zoo.MODELS.items():
            model = build()
            cases.append((name, model, model_zoo.calibration_samples(model, args.samples, seed=0),
                          model_zoo.calibration_samples(model, args.samples, seed=1)))
    if args.efficientnet:
        stem = str(EFFICIENTNET)[:-5]
        cases.append((EFFICIENTNET.name, str(EFFICIENTNET), _first(stem + "_calib.npz", args.samples),
                      _first(stem + "_eval.npz", args.samples)))
    print(f"machine: {os.cpu_count()} cores, numpy {np.__version__}; {args.samples} calibration + "
          f"{args.samples} evaluation samples per model")
    header = (f"{'model':<24} {'config':<12} {'compile s':>9} {'runtime dB':>10} {'QDQ dB':>7} {'top-1':>6} "
              f"{'nudge':>7} {'bias bits lost':>14} {'layer mismatches (ties)':>24} {'ORT float ms':>12} {'qlower ms':>9}")
    print(header)
    print("-" * len(header))
    for name, model, calib, evaluation in cases:
        depthwise = None
        for config in configs:
            if CONFIGS[config][1].get("layers_16bit") == "first-depthwise" and depthwise is None:
                probe = compile_model(model, "mmav2", calib)
                try:
                    depthwise = first_depthwise(probe)
                except ValueError:
                    print(f"{name:<24} {config:<12} (no depthwise conv: skipped)")
                    continue
            r = measure(name, model, calib, evaluation, config, depthwise)
            ties = f"{r['mismatch']}/{r['elements']} ({r['mismatch'] - r['unexcused']} ties)"
            print(f"{r['model']:<24} {r['config']:<12} {r['compile_s']:9.2f} {r['runtime_db']:10.2f} {r['qdq_db']:7.2f} "
                  f"{r['top1']:6.1%} {r['nudge']:7.3%} {r['bias_bits_lost']:14.2f} {ties:>24} "
                  f"{r['ort_ms']:12.2f} {r['ours_ms']:9.2f}", flush=True)
        if depthwise:
            print(f"{'':<24} (16-bit layer in the dw16 rows: {depthwise})")


if __name__ == "__main__":
    main()
