"""The ``qlower`` command line: compile, run, inspect.

Every failure the user can fix ends in one readable line on stderr and exit status 2 — never a
stack trace and never a half-written output file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx

from passes.errors import PassError
from runtime.errors import ProgramError

from .errors import CompileError

USER_ERRORS = (CompileError, PassError, ProgramError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlower", description="Compile float ONNX CNNs to a TIDL-like integer IR and run it bit-exactly.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile MODEL.onnx to DIR/model.qir and DIR/model.qdq.onnx")
    c.add_argument("model", help="float ONNX model")
    c.add_argument("--target", default="mmav2", choices=["mmav2", "mmav1"])
    c.add_argument("--calib", help=".npz with one array per model input (samples on axis 0), a .npy, or a folder of "
                   ".npy/.npz files or of images; optional for a pre-quantized (QDQ) model, whose scales are used as given")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--dump-dir", help="write the ONNX model after every pass (NN_<pass>.onnx) and summary.txt here")
    c.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="fix an input's symbolic dims (repeatable)")
    c.add_argument("--batch-size", type=int, help="fix a symbolic batch dim (dim 0) of every input")
    c.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "entropy", "mse"],
                   help="range estimator: min/max, a percentile of |x|, TensorRT's KL divergence, or least "
                        "quantization MSE (the last three from a streaming histogram)")
    c.add_argument("--percentile", type=float, default=99.99)
    c.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it shows only when stderr is a terminal anyway)")
    img = c.add_argument_group("calibration images (--calib FOLDER of images; TIDL's input_mean / input_scale)")
    img.add_argument("--mean", metavar="M[,M,M]", help="per-channel mean subtracted from 0..255 pixels (default 0)")
    img.add_argument("--std", metavar="S[,S,S]", help="per-channel divisor after the mean (default 1; TIDL's "
                     "input_scale is 1/std)")
    img.add_argument("--size", metavar="HxW", help="resize images to HxW (default: the model input's size)")
    img.add_argument("--layout", choices=["NCHW", "NHWC"], help="model input layout (default: guessed from its shape)")
    img.add_argument("--channel-order", choices=["rgb", "bgr"], default="rgb")
    img.add_argument("--resize", choices=["stretch", "crop"], default="stretch",
                     help="stretch to HxW, or scale the shorter side and take the centre crop")
    c.add_argument("--eval", metavar="DATA.npz", help="after compiling, measure accuracy on this data")
    c.add_argument("--bits", type=int, default=8, choices=[8, 16], help="weights and activations width (16: int64 accumulation)")
    c.add_argument("--multiplier-bits", type=int, choices=[8, 16, 31],
                   help="mmav2 requant multiplier width (default 8, as TIDL); weight scales are nudged to fit")
    c.add_argument("--bias-bits", type=int, choices=[16, 32], help="bias width (TDA4VM: 16)")
    c.add_argument("--asymmetric", action="store_true", help="mmav2: asymmetric activations (zero points folded into the bias)")
    c.add_argument("--depthwise-per-channel", action="store_true", help="mmav1: per-channel weight scales for depthwise convs")
    c.add_argument("--16bit-layers", dest="layers_16bit", metavar="NAME,...", default="",
                   help="ONNX node names whose outputs and weights are 16-bit (the rest 8-bit)")
    c.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of conv->conv pairs (ReLU or nothing between them)")
    c.add_argument("--bias-correction", action="store_true",
                   help="correct each layer's bias by its mean float-vs-quantized output shift on the calibration data")
    c.add_argument("--weight-clip", type=float, metavar="SIGMAS",
                   help="clip each weight channel to its median +- SIGMAS standard deviations before choosing scales")
    c.add_argument("--auto-16bit", type=float, nargs="?", const=30.0, metavar="SQNR_DB",
                   help="promote the most sensitive layers to 16 bits until the output SQNR on calibration "
                        "samples reaches SQNR_DB (default 30)")
    c.add_argument("--auto-16bit-budget", type=int, metavar="N", help="promote at most N layers (--auto-16bit)")
    c.add_argument("--snap-scales", action="store_true",
                   help="pre-quantized model: round its scales up to powers of two (mmav1) and report the largest change")
    c.add_argument("--deny-list", metavar="OPTYPE|NAME,...", default="",
                   help="op types or node names to run as float layers on the host (see offload.txt)")

    r = sub.add_parser("run", help="run a compiled program on inputs")
    r.add_argument("program", help="model.qir")
    r.add_argument("--input", required=True, help=".npz keyed by input name, samples on axis 0")
    r.add_argument("--output", required=True, help=".npz to write, keyed by output name")
    r.add_argument("--raw", action="store_true", help="write raw integers instead of dequantized floats")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run the batches in N worker processes (one BLAS thread each unless OPENBLAS_NUM_THREADS "
                        "is set); the outputs are the same")
    r.add_argument("--low-memory", action="store_true",
                   help="keep no float32 copies of conv/gemm weights between batches (less memory, a little slower)")
    r.add_argument("--profile", action="store_true",
                   help="print where the time went: per layer kind, and the slowest layers (see --profile-top)")
    r.add_argument("--profile-top", type=int, default=20, metavar="N", help="layers listed by --profile (0: all)")

    i = sub.add_parser("inspect", help="print the layers of a .qir or the nodes of an .onnx")
    i.add_argument("file")
    return parser


def _cmd_compile(args) -> int:
    from .api import compile_model
    from .calibration_data import load_calibration
    from .loader import parse_input_shape

    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    for flag, folder in (("--out", args.out), ("--dump-dir", args.dump_dir)):
        if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
            raise CompileError(f"{flag} '{folder}' exists and is not a directory")
    calib = _data_source(args.calib, args) if args.calib else None
    result = compile_model(args.model, target=args.target, calibration=calib, input_shapes=shapes or None, batch_size=args.batch_size,
                           calib_method=args.calib_method, percentile=args.percentile, dump_dir=args.dump_dir,
                           progress=args.progress,
                           bits=args.bits, multiplier_bits=args.multiplier_bits, bias_bits=args.bias_bits,
                           asymmetric=args.asymmetric, depthwise_per_channel=args.depthwise_per_channel,
                           layers_16bit=[n for n in args.layers_16bit.split(",") if n],
                           deny_list=[n.strip() for n in args.deny_list.split(",") if n.strip()],
                           equalize=args.equalize, bias_correction=args.bias_correction, weight_clip=args.weight_clip,
                           auto_16bit=args.auto_16bit, auto_16bit_budget=args.auto_16bit_budget,
                           snap_scales=args.snap_scales)
    # Check the evaluation data before writing anything: bad --eval data must not leave outputs.
    eval_data = load_calibration(_data_source(args.eval, args), result.input_specs) if args.eval else None
    paths = result.save(args.out)
    print(result.report.summary())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if eval_data is not None:
        from .evaluate import evaluate

        print(evaluate(result, eval_data).text())
    return 0


def _data_source(path: str, args):
    """``path`` as given, or an ``ImageFolder`` when any image preprocessing option is set."""
    from .calibration_data import ImageFolder

    options = (args.mean, args.std, args.size, args.layout)
    if all(o is None for o in options) and args.channel_order == "rgb" and args.resize == "stretch":
        return path  # a folder of images then gets the default preprocessing (stated in the report)
    if not os.path.isdir(path):
        raise CompileError(f"'{path}': image options (--mean, --std, --size, --layout, --channel-order, --resize) "
                           "need a folder of images")

    def floats(text: str | None, flag: str, default: float) -> tuple[float, ...]:
        if text is None:
            return (default,)
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise CompileError(f"{flag} '{text}': expected numbers separated by commas") from None

    size = None
    if args.size is not None:
        parts = args.size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise CompileError(f"--size '{args.size}': expected HxW, e.g. 224x224")
        size = (int(parts[0]), int(parts[1]))
    return ImageFolder(path, mean=floats(args.mean, "--mean", 0.0), std=floats(args.std, "--std", 1.0), size=size,
                       layout=args.layout, channel_order=args.channel_order, resize=args.resize)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CompileError(f"'{path}' is not a readable .npz of plain arrays ({exc})") from None


def _cmd_run(args) -> int:
    from runtime import load_program
    from runtime.batches import run_batches, sample_count
    from runtime.profile import Profile

    program = load_program(args.program)
    data = _load_npz(args.input)
    if len(program.inputs) == 1 and len(data) == 1:
        data = {program.inputs[0]: next(iter(data.values()))}
    missing = [n for n in program.inputs if n not in data]
    if missing:
        raise CompileError(f"'{args.input}' lacks input(s) {missing}; it holds {sorted(data)}")
    data = {k: data[k] for k in program.inputs}
    try:
        n = sample_count(data)
    except ProgramError as exc:
        raise CompileError(f"'{args.input}': {exc}") from None
    if n == 0:
        raise CompileError(f"'{args.input}' holds no samples (axis 0 has length 0)")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CompileError(f"--output '{out}': folder '{out.parent}' does not exist")
    if out.is_dir():
        raise CompileError(f"--output '{out}' is a folder; give the .npz file to write")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--jobs", args.jobs, 1),
                               ("--profile-top", args.profile_top, 0)):
        if value < least:
            raise CompileError(f"{flag} {value}: give a number of at least {least}")
    if args.profile and args.jobs > 1:
        raise CompileError("--profile measures one process: drop --jobs")
    profile = Profile(program) if args.profile else None
    stacked = run_batches(program, data, batch_size=args.batch_size, jobs=args.jobs, raw=args.raw,
                          keep_float_weights=not args.low_memory, on_batch=profile.add if profile else None)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **stacked)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"ran {n} samples; wrote {', '.join(f'{k} {v.dtype}{list(v.shape)}' for k, v in stacked.items())} to {out}")
    if profile is not None:
        print(profile.table(top=args.profile_top or None))
    return 0


def _cmd_inspect(args) -> int:
    path = Path(args.file)
    if not path.exists():
        raise CompileError(f"'{path}' does not exist")
    if not path.is_file():
        raise CompileError(f"'{path}' is not a file; give a .qir program or an .onnx model")
    if path.suffix == ".qir":
        from runtime import load_program
        from runtime.text import program_to_text

        print(program_to_text(load_program(path)), end="")
        return 0
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 (protobuf raises several types for a non-ONNX file)
        raise CompileError(f"'{path}' is neither a .qir program nor an ONNX model ({exc.__class__.__name__})") from None
    print(f"{path.name}: opset {[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}, "
          f"{len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers")
    for node in model.graph.node:
        meta = "".join(f"  [{e.key}={e.value}]" for e in node.metadata_props)
        print(f"  {node.name or '<unnamed>'} ({node.op_type}): {', '.join(node.input)} -> {', '.join(node.output)}{meta}")
    return 0


def _one_line(message: str) -> str:
    """A multi-line message (e.g. the list of unsupported nodes) as one line: items after a line
    ending in ':' follow it, other lines are joined with '; '."""
    text = ""
    for line in (part.strip() for part in str(message).splitlines()):
        if line:
            text = line if not text else text + (" " if text.endswith(":") else "; ") + line
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"compile": _cmd_compile, "run": _cmd_run, "inspect": _cmd_inspect}[args.command]
    try:
        return handler(args)
    except USER_ERRORS as exc:
        print(f"qlower: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable or missing folders and files: the user's to fix, not a bug
        where = f"'{exc.filename}': " if exc.filename else ""
        print(f"qlower: error: {where}{_one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
