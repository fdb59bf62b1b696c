"""The public Python API: ``compile_model`` and its ``CompileResult``.

Stages (DESIGN.md): load and check -> pass pipeline (cleanup, constant folding, BatchNorm folding,
activation fusion) -> layer plan -> calibration -> scale selection -> QDQ model -> lowering.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from passes.base import PassResult
from passes.constant_folding import FoldConstants
from passes.equalization import ClipWeightOutliers, EqualizeLayers
from passes.errors import PassError
from passes.insert_qdq import InsertQDQ
from passes.layer_plan import LayerPlan, plan_layers
from passes.pipeline import run_default_pipeline
from passes.qdq_import import ImportQDQ, KeepQDQBoundaries, has_qdq, read_annotations
from passes.qparams import QParamTable
from passes.targets import TargetPreset, get_target
from runtime.ir import Program
from runtime.serialize import save_program

from .bias_correction import correct_biases
from .calibration import METHODS as CALIBRATION_METHODS
from .calibration import collect_ranges
from .calibration_data import load_calibration
from .dump import DumpInstrument, record_step
from .errors import CompileError
from .loader import load_model
from .lowering import lower_program, static_value_info
from .mixed_precision import choose_16bit_layers
from .offload import check_float_groups, offload_report
from .prequantized import lower_prequantized, prequantized_qparams, uncovered_tensors
from .report import CompileReport
from .scales import choose_qparams

__version__ = "0.1.0"


@dataclass
class CompileResult:
    """What a compile produced: the integer program, the QDQ model, and how they were made."""

    program: Program
    qdq_model: onnx.ModelProto
    source_model: onnx.ModelProto
    float_model: onnx.ModelProto
    plan: LayerPlan
    qparams: QParamTable
    target: TargetPreset
    report: CompileReport
    input_specs: dict = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``model.qir``, ``model.qdq.onnx``, ``report.txt`` and ``offload.txt``/``.json``; each file appears complete or
        not at all (written under a temporary name, then renamed)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"program": out / "model.qir", "qdq_model": out / "model.qdq.onnx", "report": out / "report.txt"}
        save_program(self.program, paths["program"])
        _atomic_write(paths["qdq_model"], self.qdq_model.SerializeToString())
        _atomic_write(paths["report"], self.report.text().encode())
        if self.report.offload is not None:  # which nodes run in float on the host, and why
            paths["offload"], paths["offload_json"] = out / "offload.txt", out / "offload.json"
            _atomic_write(paths["offload"], self.report.offload.text().encode())
            _atomic_write(paths["offload_json"], self.report.offload.to_json().encode())
        return paths


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _in_file(source_name: str, exc: Exception) -> CompileError:
    return CompileError(f"{source_name}: {exc}")


def _condition_weights(model: onnx.ModelProto, equalize: bool, weight_clip: float | None,
                       report: CompileReport) -> onnx.ModelProto:
    """Cross-layer equalization, then weight outlier clipping, on the fused float graph."""
    if equalize:
        result = EqualizeLayers()(model, in_place=True)  # (the pipeline's own copy)
        model = result.model
        skipped = [c for c in result.changes if "not equalized" in c]
        report.notes.append(result.changes[0] if result.modified else "equalization: nothing to equalize")
        if skipped:
            report.notes.append(f"equalization skipped {len(skipped)} pair(s): " + "; ".join(skipped))
    if weight_clip is not None:
        result = ClipWeightOutliers(weight_clip)(model, in_place=True)
        model = result.model
        report.notes.extend(result.changes)
    return model


def compile_model(model_or_path, target: str = "mmav2", calibration=None, *, bits: int = 8,
                  input_shapes: dict[str, tuple[int, ...]] | None = None, batch_size: int | None = None,
                  calib_method: str = "minmax", percentile: float = 99.99,
                  dump_dir: str | os.PathLike | None = None, multiplier_bits: int | None = None,
                  bias_bits: int | None = None, asymmetric: bool = False, depthwise_per_channel: bool = False,
                  layers_16bit=None, snap_scales: bool = False, deny_list=None, equalize: bool = False,
                  bias_correction: bool = False, weight_clip: float | None = None,
                  auto_16bit: float | None = None, auto_16bit_budget: int | None = None,
                  progress: bool | None = None) -> CompileResult:
    """Compile a float ONNX model (a path or ModelProto) for ``target`` ('mmav2' or 'mmav1').

    ``calibration``: an .npz or .npy path, a folder of .npy files or of images
    (compiler/calibration_data.py; ``ImageFolder`` states the preprocessing), a dict input name ->
    samples stacked on axis 0, or an iterable of such dicts. ``calib_method``: minmax, percentile,
    entropy or mse (compiler/calibration.py); ``progress``: a progress bar on stderr (None: when
    stderr is a terminal). A model that
    holds QuantizeLinear/DequantizeLinear is pre-quantized: its scales are imported and used as
    given (compiler/prequantized.py); calibration is then optional and only fills activations the
    QDQ model leaves unquantized. ``snap_scales`` rounds imported scales up to powers of two (mmav1).
    Target options (passes.targets.get_target): ``multiplier_bits`` 8|16|31 (mmav2; default 8, as
    TIDL), ``bias_bits`` 16|32, ``asymmetric`` activations (mmav2), ``depthwise_per_channel``
    (mmav1), ``layers_16bit`` (ONNX node names kept in 16 bits). ``deny_list``: op types or node
    names to run as float layers on the host even when they have an integer lowering; any node
    without one runs in float too, and ``report.offload`` (offload.txt) says which and why.
    Calibration quality (float models): ``equalize`` runs cross-layer equalization on the fused
    graph (passes/equalization.py); ``weight_clip`` = k clips each weight channel to its median
    +- k standard deviations before scales are chosen; ``bias_correction`` corrects each layer's
    bias by the mean float-vs-quantized output shift on the calibration set
    (compiler/bias_correction.py). ``auto_16bit`` = an output SQNR target in dB: the most
    sensitive layers are promoted to 16 bits until the target (or ``auto_16bit_budget`` layers) is
    reached (compiler/mixed_precision.py).
    Raises CompileError with one readable message for any input it cannot handle.
    """
    source_name = os.path.basename(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else (
        model_or_path.graph.name or "model")
    try:
        preset = get_target(target, bits, multiplier_bits=multiplier_bits, bias_bits=bias_bits, asymmetric=asymmetric,
                            depthwise_per_channel=depthwise_per_channel, layers_16bit=tuple(layers_16bit or ()))
    except ValueError as exc:
        raise CompileError(str(exc)) from None
    if calib_method not in CALIBRATION_METHODS:
        raise CompileError(f"unknown calibration method '{calib_method}'; choose {', '.join(CALIBRATION_METHODS)}")
    report = CompileReport(source=source_name, target=preset)
    clock = time.perf_counter()

    loaded = load_model(model_or_path, input_shapes=input_shapes, batch_size=batch_size)
    report.notes.extend(loaded.notes)
    prequantized = has_qdq(loaded.model)
    if calibration is None and not prequantized:
        raise CompileError("a float model needs calibration data (--calib DATA.npz)")
    report.stage("load", clock)

    clock = time.perf_counter()
    instruments = (DumpInstrument(dump_dir),) if dump_dir is not None else ()
    try:
        # Constants first (QDQ is never folded), so scales computed from constants in the graph
        # (as some PyTorch exports do) are constants when the import reads them.
        # Both are one recorded step, 00_import_qdq in --dump-dir (before the pipeline's 01...).
        imported, pre_records = None, []
        if prequantized:
            folded = FoldConstants()(loaded.model)
            imported = ImportQDQ()(folded.model, in_place=True)  # (folding made a copy already)
            changes = ([f"constants folded first: {c}" for c in folded.changes] if folded.modified else []) + \
                imported.changes
            pre_records.append(record_step(instruments, 0, 0, ImportQDQ.name, len(loaded.model.graph.node),
                                           PassResult(imported.model, imported.modified, changes),
                                           time.perf_counter() - clock))
        pipeline = run_default_pipeline(imported.model if imported else loaded.model, instruments=instruments)
        model = pipeline.model
        if prequantized:
            step, before = time.perf_counter(), len(model.graph.node)
            kept = KeepQDQBoundaries()(model, in_place=True)
            pre_records.append(record_step(instruments, len(pipeline.records) + 1, 1, KeepQDQBoundaries.name,
                                           before, kept, time.perf_counter() - step))
            model = kept.model
            report.notes.extend(imported.changes)
        elif equalize or weight_clip is not None:
            model = _condition_weights(model, equalize, weight_clip, report)
        plan = plan_layers(model, deny=tuple(deny_list or ()))
        report.offload = offload_report(plan, tuple(deny_list or ()))
        check_float_groups(plan)
    except PassError as exc:
        raise _in_file(source_name, exc) from None
    report.pass_records = pre_records[:1] + pipeline.records + pre_records[1:]
    if not pipeline.converged:
        report.notes.append("pass pipeline stopped at its round cap before converging")
    report.stage("passes", clock)

    clock = time.perf_counter()
    to_calibrate = uncovered_tensors(plan, read_annotations(model)) if prequantized else plan.activation_tensors()
    if prequantized and to_calibrate and calibration is None:
        raise CompileError(f"{source_name}: the QDQ model leaves {len(to_calibrate)} activation(s) unquantized "
                           f"({', '.join(repr(t) for t in to_calibrate[:6])}); quantize them in the model or "
                           "give calibration data (--calib DATA.npz) to calibrate them")
    shapes = types = None
    if not prequantized:  # one shape inference for calibration, scales and lowering (same graph)
        try:
            shapes, types = static_value_info(model)
        except Exception:  # noqa: BLE001 (each stage then runs inference itself and fails as before)
            shapes = types = None
    ranges = {}
    if to_calibrate:
        data = load_calibration(calibration, loaded.inputs)
        ranges = collect_ranges(model, to_calibrate, data, method=calib_method, percentile=percentile,
                                progress=progress, activation_bits=preset.activation_bits, element_types=types)
        report.notes.append(f"calibrated {len(ranges)} tensors on {data.num_samples} samples ({calib_method}; "
                            f"{data.origin})")
    report.stage("calibration", clock)

    clock = time.perf_counter()
    try:
        if prequantized:
            scales = prequantized_qparams(model, plan, preset, ranges, snap_scales=snap_scales)
            qparams, preset, native_bits = scales.qparams, scales.target, scales.native_multiplier_bits
            report.notes.extend(scales.notes)
        else:
            qparams = choose_qparams(model, plan, ranges, preset, shapes)
            if auto_16bit is not None:
                mixed = choose_16bit_layers(model, plan, ranges, preset, data, auto_16bit, auto_16bit_budget)
                report.notes.append(mixed.summary())
                preset = report.target = mixed.preset
                qparams = choose_qparams(model, plan, ranges, preset, shapes)
            if bias_correction:
                corrected = correct_biases(model, plan, qparams, data)
                report.notes.append(corrected.summary())
                qparams = choose_qparams(model, plan, ranges, preset, shapes)  # bias encodings of the new biases
    except CompileError as exc:
        raise _in_file(source_name, exc) from None
    report.qparams = qparams
    report.stage("scales", clock)

    clock = time.perf_counter()
    try:
        qdq_result = InsertQDQ(plan, qparams)(model)
    except PassError as exc:
        raise _in_file(source_name, exc) from None
    qdq_model = qdq_result.model
    index = report.pass_records[-1].index + 1 if report.pass_records else 1
    report.pass_records.append(record_step(instruments, index, 1, InsertQDQ.name, len(model.graph.node),
                                           qdq_result, time.perf_counter() - clock))
    for inst in instruments:
        inst.finish(report.pass_records)
    report.stage("qdq", clock)

    clock = time.perf_counter()
    metadata = {"source": source_name, "target": preset.name, "bits": str(bits),
                "multiplier_bits": str(preset.multiplier_bits),
                "calibration": "qdq (pre-quantized)" if prequantized else calib_method,
                "qlower": __version__}
    try:
        if prequantized:
            program = lower_prequantized(model, plan, qparams, preset, metadata, native_bits, report.notes)
        else:
            program = lower_program(model, plan, qparams, preset, metadata, shapes)
    except CompileError as exc:
        raise _in_file(source_name, exc) from None
    report.program = program
    report.stage("lowering", clock)
    return CompileResult(program, qdq_model, loaded.model, model, plan, qparams, preset, report, dict(loaded.inputs))

