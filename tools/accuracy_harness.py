"""The accuracy harness: qlower against onnxruntime's quantize_static, on the same data.

One table per model. Rows: the float model; qlower per configuration (target, range estimator,
corrections), measured on its QDQ model in onnxruntime (optimizations off: the float emulation of
the integer program) and on the IR runtime; onnxruntime's ``quantize_static`` (QDQ format,
per-channel int8 weights, after ``quant_pre_process``; MinMax and Percentile; uint8 and int8
activations), its QDQ model run the same way. Columns: output SQNR against the float model in dB,
top-1 agreement with the float model (classifiers: [N, K] outputs; [N, T, C] outputs count per
position), compile (qlower: load + passes + calibration + corrections + lowering; onnxruntime:
pre-processing + calibration + quantization) time, the calibration time (qlower: the calibration and
scale stages, which hold the corrections; onnxruntime: all of quantize_static), and the peak
resident memory of the process that compiled (each row runs in a fresh process, so rows do not
inherit each other's peaks; for qlower it covers the whole compile, lowering included).

A qlower configuration is ``TARGET[:ESTIMATOR[:FLAGS]]``, FLAGS joined by '+': ``eq`` (cross-layer
equalization), ``bc`` (bias correction), ``clip=K`` (weight clipping at K sigmas), ``m8`` / ``m16``
/ ``m31`` (multiplier bits), ``auto16=DB`` (automatic 16-bit layers up to an SQNR target). E.g.
``mmav2:minmax:bc`` or ``mmav1:percentile:eq+bc``.

    python -m tools.accuracy_harness                                   # zoo + EfficientNet-Lite0 if present
    python -m tools.accuracy_harness --model M.onnx --calib C.npz --eval E.npz --input-shape x:1x3x48x320
    python -m tools.accuracy_harness --zoo-only --configs mmav2:minmax,mmav2:minmax:bc --no-ort

Without --calib/--eval for a --model, image-like synthetic samples are drawn (tools.model_zoo), and
the table title says so. ``M_calib.npz`` / ``M_eval.npz`` beside ``M.onnx`` are used when present.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "efficientnet_lite0.onnx"
DEFAULT_CONFIGS = ("mmav2:minmax", "mmav2:minmax:bc", "mmav2:{method}:bc", "mmav1:minmax", "mmav1:minmax:eq+bc")
ORT_CONFIGS = (("uint8", "MinMax"), ("uint8", "Percentile"), ("int8", "MinMax"), ("int8", "Percentile"))


@dataclass
class Case:
    """One model and its data: sources are paths or in-memory values (ModelProto bytes, dicts)."""

    name: str
    model: str | bytes
    calib: str | dict
    evaluation: str | dict
    input_shapes: dict | None = None
    synthetic: bool = False


# --------------------------------------------------------------------------- measures


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def agreement(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Top-1 agreement for classifier-like outputs: [N, K] per sample, [N, T, C] per position;
    None for other shapes (segmentation maps, detection heads), where argmax means nothing."""
    if reference.ndim == 2 and reference.shape[1] > 1:
        return float(np.mean(reference.argmax(-1) == test.argmax(-1)))
    if reference.ndim == 3 and reference.shape[2] > 1:
        return float(np.mean(reference.argmax(-1) == test.argmax(-1)))
    return None


def _stack(outputs: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    return {n: np.concatenate([o[n] for o in outputs]) for n in names}


def _compare(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> tuple[float, float | None]:
    from compiler.metrics import sqnr_db

    names = list(reference)
    ref = np.concatenate([reference[n].reshape(len(reference[n]), -1) for n in names], axis=1)
    got = np.concatenate([test[n].reshape(len(test[n]), -1) for n in names], axis=1)
    top1 = agreement(reference[names[0]], test[names[0]]) if len(names) == 1 else None
    return sqnr_db(ref, got), top1


def _run_onnx(model, batches, names, optimize: bool) -> dict[str, np.ndarray]:
    from compiler.onnx_runner import make_session

    session = make_session(model, optimize=optimize)
    return _stack([dict(zip(names, session.run(names, feeds))) for feeds in batches], names)


def _load(case: Case):
    import onnx

    from compiler.calibration_data import load_calibration
    from compiler.loader import load_model

    loaded = load_model(case.model if isinstance(case.model, str) else onnx.load_from_string(case.model),
                        input_shapes=case.input_shapes)
    return loaded, load_calibration(case.calib, loaded.inputs), load_calibration(case.evaluation, loaded.inputs)


def parse_config(spec: str) -> tuple[str, dict]:
    """'mmav2:minmax:bc+eq' -> (label, compile_model keyword arguments)."""
    parts = spec.split(":")
    target = parts[0]
    kwargs: dict = {"target": target, "calib_method": parts[1] if len(parts) > 1 and parts[1] else "minmax"}
    for flag in (parts[2].split("+") if len(parts) > 2 and parts[2] else []):
        if flag == "eq":
            kwargs["equalize"] = True
        elif flag == "bc":
            kwargs["bias_correction"] = True
        elif flag.startswith("clip="):
            kwargs["weight_clip"] = float(flag[5:])
        elif flag in ("m8", "m16", "m31"):
            kwargs["multiplier_bits"] = int(flag[1:])
        elif flag.startswith("auto16="):
            kwargs["auto_16bit"] = float(flag[7:])
        else:
            raise ValueError(f"unknown flag '{flag}' in configuration '{spec}'")
    return f"qlower {spec}", kwargs


def qlower_row(case: Case, spec: str, runtime: bool) -> dict:
    """Compile with qlower (in this process) and measure; see the module docstring."""
    from compiler.api import compile_model

    label, kwargs = parse_config(spec)
    loaded, _, evaluation = _load(case)
    base_mb = peak_rss_mb()
    start = time.perf_counter()
    result = compile_model(loaded.model, calibration=case.calib, input_shapes=case.input_shapes, **kwargs)
    compile_s = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    names = [o.name for o in loaded.model.graph.output]
    reference = _run_onnx(loaded.model, evaluation.batches(1), names, optimize=True)
    qdq = _run_onnx(result.qdq_model, evaluation.batches(1), names, optimize=False)
    stages = result.report.stage_seconds
    row = {"label": label, "compile_s": compile_s, "peak_mb": peak_mb, "base_mb": base_mb,
           "calib_s": stages.get("calibration", 0.0) + stages.get("scales", 0.0)}
    row["qdq_db"], row["qdq_top1"] = _compare(reference, qdq)
    if runtime:
        outs = _stack([result.program.run(feeds) for feeds in evaluation.batches(1)], names)
        row["rt_db"], row["rt_top1"] = _compare(reference, outs)
    promoted = [n for n in result.report.notes if n.startswith("auto-16bit")]
    row["note"] = promoted[0] if promoted else ""
    return row


class _Reader:
    """onnxruntime's CalibrationDataReader over a CalibrationSet, one sample per call."""

    def __init__(self, data):
        self._it = data.batches(1)

    def get_next(self):
        return next(self._it, None)


def ort_row(case: Case, activation: str, method: str) -> dict:
    """onnxruntime quantize_static: quant_pre_process, then QDQ, per-channel int8 weights."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    loaded, calib, evaluation = _load(case)
    base_mb = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        pre, out = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "qdq.onnx")
        start = time.perf_counter()
        note = ""
        with contextlib.redirect_stdout(io.StringIO()):  # its calibrators print progress
            try:
                quant_pre_process(loaded.model, pre)
            except Exception as exc:  # noqa: BLE001 - its symbolic shape inference asserts on some models
                quant_pre_process(loaded.model, pre, skip_symbolic_shape=True)
                note = f"quant_pre_process needed skip_symbolic_shape ({exc.__class__.__name__})"
            quantize_static(pre, out, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method))
        compile_s = time.perf_counter() - start
        peak_mb = peak_rss_mb()
        quantized = onnx.load(out)
    names = [o.name for o in loaded.model.graph.output]
    reference = _run_onnx(loaded.model, evaluation.batches(1), names, optimize=True)
    qdq = _run_onnx(quantized, evaluation.batches(1), names, optimize=False)
    row = {"label": f"ORT quantize_static {activation} {method}", "compile_s": compile_s, "peak_mb": peak_mb,
           "base_mb": base_mb, "calib_s": compile_s, "note": note}
    row["qdq_db"], row["qdq_top1"] = _compare(reference, qdq)
    return row


def _in_child(fn, *args) -> dict:
    """Run ``fn(*args)`` in a fresh process (so its peak memory is its own); errors become rows."""
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(fn, *args).result()
    except Exception as exc:  # noqa: BLE001 - a failing configuration is reported in its row
        return {"label": f"{fn.__name__} {args[1:]}", "error": f"{exc.__class__.__name__}: {exc}"}


# --------------------------------------------------------------------------- table


def _fmt(value, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:{width}{spec}}"


def _pct(value, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{100 * value:{width - 1}.1f}%"


def format_table(case: Case, rows: list[dict], n_calib: int, n_eval: int) -> str:
    data = "synthetic image-like samples" if case.synthetic else "given files"
    header = (f"{'configuration':<40} {'QDQ dB':>7} {'IR dB':>7} {'top-1 QDQ':>9} {'top-1 IR':>8} "
              f"{'calib s':>8} {'compile s':>9} {'peak MB':>8}")
    lines = [f"== {case.name}: {n_calib} calibration / {n_eval} evaluation samples ({data}) ==", header]
    lines.append("-" * len(lines[-1]))
    lines.append(f"{'float model (onnxruntime)':<40} {'inf':>7} {'-':>7} {'100.0%':>9} {'-':>8} {'-':>8} {'-':>9} "
                 f"{'-':>8}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:<40} failed: {r['error']}")
            continue
        lines.append(f"{r['label']:<40} {_fmt(r.get('qdq_db'), '.2f', 7)} {_fmt(r.get('rt_db'), '.2f', 7)} "
                     f"{_pct(r.get('qdq_top1'), 9)} {_pct(r.get('rt_top1'), 8)} {_fmt(r['calib_s'], '.2f', 8)} "
                     f"{_fmt(r['compile_s'], '.2f', 9)} {_fmt(r['peak_mb'], '.0f', 8)}"
                     + (f"  {r['note']}" if r.get("note") else ""))
    ours = [r for r in rows if "error" not in r and r["label"].startswith("qlower mmav2")
            and "auto16" not in r["label"]]
    ort = [r for r in rows if "error" not in r and r["label"].startswith("ORT")]
    if ours and ort:
        best_ours = max(ours, key=lambda r: r["qdq_db"])
        best_ort = max(ort, key=lambda r: r["qdq_db"])
        margin = best_ours["qdq_db"] - best_ort["qdq_db"]
        verdict = "met" if margin >= 1.0 else "NOT met"
        lines.append(f"bar (qlower mmav2 8-bit >= 1 dB above onnxruntime's best): {verdict}: "
                     f"{best_ours['label']} {best_ours['qdq_db']:.2f} dB vs {best_ort['label']} "
                     f"{best_ort['qdq_db']:.2f} dB ({margin:+.2f} dB)")
    return "\n".join(lines)


def _cases(args) -> list[Case]:
    from tools import model_zoo

    shapes = None
    if args.input_shape:
        from compiler.loader import parse_input_shape

        shapes = dict(parse_input_shape(t) for t in args.input_shape)
    cases = []
    for path in args.model or []:
        stem = Path(path).with_suffix("")
        calib = args.calib or (f"{stem}_calib.npz" if Path(f"{stem}_calib.npz").exists() else None)
        evaluation = args.eval or (f"{stem}_eval.npz" if Path(f"{stem}_eval.npz").exists() else None)
        synthetic = calib is None or evaluation is None
        if synthetic:
            import onnx

            from compiler.loader import load_model

            model = load_model(path, input_shapes=shapes).model
            calib = calib or model_zoo.calibration_samples(model, args.samples, seed=0)
            evaluation = evaluation or model_zoo.calibration_samples(model, args.samples, seed=1)
            del onnx
        cases.append(Case(Path(path).name, path, calib, evaluation, shapes, synthetic))
    if not args.model and SHARED_MODEL.exists() and not args.zoo_only:
        stem = SHARED_MODEL.with_suffix("")
        cases.append(Case(SHARED_MODEL.name, str(SHARED_MODEL), f"{stem}_calib.npz", f"{stem}_eval.npz"))
    if not args.model or args.zoo:
        for name, build in model_zoo.MODELS.items():
            model = build()
            cases.insert(0, Case(name, model.SerializeToString(), model_zoo.calibration_samples(model, args.samples, 0),
                                 model_zoo.calibration_samples(model, args.samples, 1), None, True))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="an ONNX model (repeatable)")
    parser.add_argument("--calib", help="calibration .npz for --model")
    parser.add_argument("--eval", help="evaluation .npz for --model")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    parser.add_argument("--zoo", action="store_true", help="also the tools/model_zoo models")
    parser.add_argument("--zoo-only", action="store_true", help="only the tools/model_zoo models")
    parser.add_argument("--samples", type=int, default=32, help="synthetic samples for calibration and evaluation")
    parser.add_argument("--configs", help="qlower configurations, comma-separated (see above); default: "
                        + ", ".join(DEFAULT_CONFIGS) + ", with {method} every range estimator but minmax")
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantize_static rows")
    parser.add_argument("--no-runtime", action="store_true", help="skip the IR runtime column (QDQ only)")
    parser.add_argument("--in-process", action="store_true", help="no child processes (peak memory is cumulative)")
    args = parser.parse_args(argv)
    run = (lambda fn, *a: fn(*a)) if args.in_process else _in_child
    if args.configs is None:
        from compiler.calibration import METHODS

        expanded = [c.format(method=m) for c in DEFAULT_CONFIGS for m in (METHODS[1:] if "{" in c else [""])]
        args.configs = ",".join(expanded)
    print(f"machine: {os.cpu_count()} cores, numpy {np.__version__}; QDQ models run in onnxruntime with "
          "graph optimizations off; peak MB = peak RSS of the compiling process")
    for case in _cases(args):
        _, calib, evaluation = _load(case)
        jobs = [(qlower_row, spec, not args.no_runtime) for spec in args.configs.split(",") if spec]
        jobs += [] if args.no_ort else [(ort_row, act, method) for act, method in ORT_CONFIGS]
        rows = []
        for fn, *params in jobs:
            rows.append(run(fn, case, *params))
            r = rows[-1]
            print(f"  [{case.name}] {r['label']}: " + (f"failed: {r['error']}" if "error" in r else
                  f"{r['qdq_db']:.2f} dB, {r['compile_s']:.1f} s"), file=sys.stderr, flush=True)
        print(format_table(case, rows, calib.num_samples, evaluation.num_samples), flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
