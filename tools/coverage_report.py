"""Coverage report: for every model of a corpus, how many layers run as integer layers and how
many fall back to float on the host (and why, by op), the output SQNR against the float model
for both targets, and the ops still not lowered.

    PYTHONPATH=. python -m tools.coverage_report [--corpus onnx-cases light zoo architectures]
        [--model PATH ...] [--shape SUBSTRING=1x3x48x320 ...] [--calib N] [--eval N] [--out FILE.md]

Corpora: ``onnx-cases`` (onnx's pytorch-converted and pytorch-operator test cases), ``light``
(onnx's light model-zoo graphs), ``zoo`` (tools/model_zoo.py), ``architectures``
(tools/architectures.py). ``--model`` adds ONNX files (for example ../shared/data/
efficientnet_lite0.onnx, or the PP-OCR det/rec/cls files inside the rapidocr-onnxruntime wheel:
``pip download rapidocr-onnxruntime --no-deps`` and unzip ``rapidocr_onnxruntime/models``).
Symbolic input dims are fixed by ``--shape`` (the first input of every model whose file name
contains SUBSTRING; PP-OCR defaults are built in), else batch 1 and 224 for the rest.

Data: a model with a ``<stem>_calib.npz`` / ``<stem>_eval.npz`` next to it uses them; the zoo and
architecture builders' own image-like samples otherwise; uniform [-1, 1] noise for the rest
(the onnx cases: their shipped input plus perturbed copies). SQNR (dB) = 10 log10(sum ref^2 /
sum (ref - ir)^2) over every float output, ref = onnxruntime on the float model.
A model that cannot be compiled is a row with the compiler's error (which names the node and op).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from compiler.api import compile_model
from compiler.errors import CompileError
from compiler.metrics import sqnr_db
from runtime.ir import RAW_DTYPES

ONNX_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
TARGETS = ("mmav2", "mmav1")
# file-name substring -> first input's shape, for models exported with symbolic dims
DEFAULT_SHAPES = {"_det_": (1, 3, 320, 320), "_rec_": (1, 3, 48, 320), "_cls_": (1, 3, 48, 192)}


@dataclass
class Row:
    model: str
    integer: int = 0
    float: int = 0
    float_ops: Counter = field(default_factory=Counter)  # (op, reason) -> count
    sqnr: dict = field(default_factory=dict)  # target -> dB (or an error text)
    seconds: float = 0.0
    error: str = ""


# ---------------------------------------------------------------------------------- inputs

def with_unit_batch(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    """Inputs whose leading dim is not 1 get a new leading axis of 1 and a Reshape back, so that
    calibration samples (which replace the batch axis) can be stacked on a fixed-batch model."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model_copy.ir_version = max(model_copy.ir_version, 4)  # new initializers need not be inputs
    graph = model_copy.graph
    inits = {i.name for i in graph.initializer}
    reshapes, new_feeds = [], {}
    for value in graph.input:
        if value.name in inits:
            continue
        x = feeds[value.name]
        if x.ndim and x.shape[0] == 1:
            new_feeds[value.name] = x
            continue
        inner = f"{value.name}__unbatched"
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name == value.name:
                    node.input[k] = inner
        graph.initializer.append(numpy_helper.from_array(np.array(x.shape, np.int64), f"{inner}_shape"))
        reshapes.append(helper.make_node("Reshape", [value.name, f"{inner}_shape"], [inner], name=f"{inner}_reshape"))
        dims = value.type.tensor_type.shape
        del dims.dim[:]
        for d in (1,) + x.shape:
            dims.dim.add().dim_value = d
        new_feeds[value.name] = x[None]
    nodes = reshapes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model_copy, new_feeds


def load_pb(path: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    with open(path, "rb") as f:
        tensor.ParseFromString(f.read())
    return numpy_helper.to_array(tensor)


def onnx_case(path: str):
    """(model, feeds with a unit batch, calibration samples) of one onnx test-data case."""
    model = onnx.load(os.path.join(path, "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    inputs = [load_pb(p) for p in sorted(glob.glob(os.path.join(path, "test_data_set_0", "input_*.pb")))]
    model, feeds = with_unit_batch(model, dict(zip(names, inputs)))
    rng = np.random.default_rng(0)
    calib = {n: np.concatenate([x] + [x * (1 + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype) for _ in range(3)])
             for n, x in feeds.items()}
    return model, calib, {n: x for n, x in feeds.items()}


def _input_shapes(model: onnx.ModelProto, name: str, shapes: dict[str, tuple]) -> dict[str, tuple]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    result = {}
    for k, value in enumerate(inputs):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in value.type.tensor_type.shape.dim]
        given = next((s for key, s in shapes.items() if key in name), None) if k == 0 else None
        if given is not None:
            result[value.name] = tuple(given)
        elif any(d is None for d in dims):
            result[value.name] = tuple(1 if i == 0 else (d or 224) for i, d in enumerate(dims))
    return result


def _noise(model: onnx.ModelProto, shapes: dict[str, tuple], n: int, seed: int) -> dict[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    data = {}
    for value in [i for i in model.graph.input if i.name not in inits]:
        shape = shapes.get(value.name) or tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        data[value.name] = rng.uniform(-1, 1, (n,) + tuple(shape[1:])).astype(np.float32)
    return data


# ---------------------------------------------------------------------------------- measuring

def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def measure(name: str, model, calib: dict, evaluation: dict, shapes: dict | None = None) -> Row:
    """Compile for both targets, run on ``evaluation`` (samples on axis 0) and compare with float."""
    row = Row(name)
    start = time.perf_counter()
    for target in TARGETS:
        try:
            result = compile_model(model, target, calib, input_shapes=shapes or None)
        except CompileError as exc:
            row.sqnr[target] = "compile error"
            row.error += f"{target}: " + str(exc).replace("\n", " | ") + " "
            continue
        except Exception as exc:  # noqa: BLE001 - a compiler bug: reported in the table, the run goes on
            row.sqnr[target] = "compile error"
            row.error += f"{target}: internal error {type(exc).__name__}: {exc} ".replace("\n", " | ")
            continue
        program = result.program
        if not row.float_ops and not row.integer:
            offload = result.report.offload
            row.integer, row.float = len(offload.integer), len(offload.float)
            row.float_ops = offload.float_reasons()
        n = next(iter(evaluation.values())).shape[0]
        refs, ours = [], []
        for k in range(n):
            feeds = {i: evaluation[i][k:k + 1] for i in program.inputs}
            try:
                got = program.run(feeds)
                try:
                    want = _reference(result.source_model, feeds, program.outputs)
                except Exception:  # noqa: BLE001 - onnxruntime cannot run some legacy forms; the
                    want = _reference(result.float_model, feeds, program.outputs)  # canonical model can
            except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
                row.sqnr[target] = f"run failed: {exc}"[:120]
                break
            for out, ref in zip(program.outputs, want):
                if program.tensors[out].dtype not in RAW_DTYPES:
                    refs.append(np.asarray(ref, np.float64).ravel())
                    ours.append(np.asarray(got[out], np.float64).ravel())
        else:
            row.sqnr[target] = sqnr_db(np.concatenate(refs), np.concatenate(ours)) if refs else "no float output"
    row.seconds = time.perf_counter() - start
    return row


# ---------------------------------------------------------------------------------- corpora

def corpus_onnx_cases():
    for path in sorted(glob.glob(os.path.join(ONNX_DATA, "pytorch-converted", "*"))
                       + glob.glob(os.path.join(ONNX_DATA, "pytorch-operator", "*"))):
        name = os.path.basename(path)
        try:
            model, calib, feeds = onnx_case(path)
        except Exception as exc:  # noqa: BLE001
            yield name, None, None, None, f"cannot read the case: {exc}"
            continue
        yield name, model, calib, {n: x for n, x in feeds.items()}, None


def corpus_light(calib_n: int, eval_n: int):
    for path in sorted(glob.glob(os.path.join(ONNX_DATA, "light", "*.onnx"))):
        model = onnx.load(path)
        shapes = _input_shapes(model, path, {})
        yield os.path.basename(path), path, _noise(model, shapes, calib_n, 0), _noise(model, shapes, eval_n, 1), None


def corpus_builders(table: dict, calib_n: int, eval_n: int):
    from tools.model_zoo import calibration_samples

    for name, build in table.items():
        model = build()
        yield name, model, calibration_samples(model, calib_n, 0), calibration_samples(model, eval_n, 1), None


def corpus_files(paths: list[str], shapes: dict, calib_n: int, eval_n: int):
    for path in paths:
        name = os.path.basename(path)
        stem = os.path.splitext(path)[0]
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001
            yield name, None, None, None, f"cannot load: {exc}"
            continue
        given = _input_shapes(model, name, shapes)
        if os.path.exists(f"{stem}_calib.npz") and os.path.exists(f"{stem}_eval.npz"):
            with np.load(f"{stem}_calib.npz") as c, np.load(f"{stem}_eval.npz") as e:
                calib = {k: c[k][:calib_n] for k in c.files}
                evaluation = {k: e[k][:eval_n] for k in e.files}
        else:
            calib, evaluation = _noise(model, given, calib_n, 0), _noise(model, given, eval_n, 1)
        yield name, (path, given), calib, evaluation, None


# ---------------------------------------------------------------------------------- the table

def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value or "-")


def table(rows: list[Row]) -> str:
    lines = ["| model | integer layers | float layers | float ops (why) | SQNR mmav2 (dB) | SQNR mmav1 (dB) | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error and not r.integer and not r.float:
            lines.append(f"| {r.model} | - | - | ERROR: {r.error[:300]} | - | - | {r.seconds:.1f} |")
            continue
        why = "; ".join(f"{n} {op}: {reason}" for (op, reason), n in sorted(r.float_ops.items())) or "-"
        if r.error:
            why += f" (ERROR: {r.error[:300]})"
        lines.append(f"| {r.model} | {r.integer} | {r.float} | {why} | {_fmt(r.sqnr.get('mmav2'))} | "
                     f"{_fmt(r.sqnr.get('mmav1'))} | {r.seconds:.1f} |")
    missing: Counter = Counter()
    for r in rows:
        for (op, reason), n in r.float_ops.items():
            if not reason.startswith("denied"):
                missing[op] += n
    lines.append("")
    lines.append("ops still not lowered (float layers over all models): "
                 + (", ".join(f"{op} ({n})" for op, n in sorted(missing.items())) or "none"))
    errors = [r for r in rows if r.error]
    lines.append(f"models: {len(rows)}, compiled for both targets: {len(rows) - len(errors)}, "
                 f"failed for at least one target: {len(errors)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.coverage_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="*", default=["onnx-cases", "light", "zoo", "architectures"],
                        choices=["onnx-cases", "light", "zoo", "architectures"])
    parser.add_argument("--model", nargs="*", default=[], help="ONNX files to add")
    parser.add_argument("--shape", action="append", default=[], metavar="SUBSTRING=1x3x48x320",
                        help="first-input shape of models whose file name contains SUBSTRING")
    parser.add_argument("--calib", type=int, default=8, help="calibration samples (default 8)")
    parser.add_argument("--eval", type=int, default=4, help="evaluation samples (default 4)")
    parser.add_argument("--match", nargs="*", default=[], metavar="SUBSTRING",
                        help="only models whose name contains one of these")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    shapes = dict(DEFAULT_SHAPES)
    for text in args.shape:
        key, _, dims = text.partition("=")
        shapes[key] = tuple(int(d) for d in dims.split("x"))

    sources = []
    if "onnx-cases" in args.corpus:
        sources.append(corpus_onnx_cases())
    if "light" in args.corpus:
        sources.append(corpus_light(args.calib, args.eval))
    if "zoo" in args.corpus:
        from tools.model_zoo import MODELS

        sources.append(corpus_builders(MODELS, args.calib, args.eval))
    if "architectures" in args.corpus:
        from tools.architectures import ARCHITECTURES

        sources.append(corpus_builders(ARCHITECTURES, args.calib, args.eval))
    sources.append(corpus_files(args.model, shapes, args.calib, args.eval))

    rows = []
    for source in sources:
        for name, model, calib, evaluation, error in source:
            if args.match and not any(m in name for m in args.match):
                continue
            if error:
                rows.append(Row(name, error=error))
            else:
                given = None
                if isinstance(model, tuple):
                    model, given = model
                rows.append(measure(name, model, calib, evaluation, given))
            r = rows[-1]
            print(f"{r.model}: " + (f"ERROR {r.error[:200]}" if r.error else
                                    f"{r.integer} integer, {r.float} float, SQNR "
                                    f"{_fmt(r.sqnr.get('mmav2'))} / {_fmt(r.sqnr.get('mmav1'))} dB ({r.seconds:.1f} s)"),
                  file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
