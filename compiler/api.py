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

from passes.base import PassRecord
from passes.errors import PassError
from passes.insert_qdq import InsertQDQ
from passes.layer_plan import LayerPlan, plan_layers
from passes.pipeline import run_default_pipeline
from passes.qparams import QParamTable
from passes.targets import TargetPreset, get_target
from runtime.ir import Program
from runtime.serialize import save_program

from .calibration import collect_ranges
from .calibration_data import load_calibration
from .dump import DumpInstrument
from .errors import CompileError
from .loader import load_model
from .lowering import lower_program
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
        """Write ``model.qir``, ``model.qdq.onnx`` and ``report.txt``; each file appears complete or
        not at all (written under a temporary name, then renamed)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"program": out / "model.qir", "qdq_model": out / "model.qdq.onnx", "report": out / "report.txt"}
        save_program(self.program, paths["program"])
        _atomic_write(paths["qdq_model"], self.qdq_model.SerializeToString())
        _atomic_write(paths["report"], self.report.text().encode())
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


def compile_model(model_or_path, target: str = "mmav2", calibration=None, *, bits: int = 8,
                  input_shapes: dict[str, tuple[int, ...]] | None = None, batch_size: int | None = None,
                  calib_method: str = "minmax", percentile: float = 99.99,
                  dump_dir: str | os.PathLike | None = None) -> CompileResult:
    """Compile a float ONNX model (a path or ModelProto) for ``target`` ('mmav2' or 'mmav1').

    ``calibration`` is an .npz path or a dict input name -> samples stacked on axis 0.
    Raises CompileError with one readable message for any input it cannot handle.
    """
    source_name = os.path.basename(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else (
        model_or_path.graph.name or "model")
    try:
        preset = get_target(target, bits)
    except ValueError as exc:
        raise CompileError(str(exc)) from None
    if calib_method not in ("minmax", "percentile"):
        raise CompileError(f"unknown calibration method '{calib_method}'; choose minmax or percentile")
    if calibration is None:
        raise CompileError("a float model needs calibration data (--calib DATA.npz)")
    report = CompileReport(source=source_name, target=preset)
    clock = time.perf_counter()

    loaded = load_model(model_or_path, input_shapes=input_shapes, batch_size=batch_size)
    report.notes.extend(loaded.notes)
    report.stage("load", clock)

    clock = time.perf_counter()
    instruments = (DumpInstrument(dump_dir),) if dump_dir is not None else ()
    try:
        pipeline = run_default_pipeline(loaded.model, instruments=instruments)
        model = pipeline.model
        plan = plan_layers(model)
    except PassError as exc:
        raise _in_file(source_name, exc) from None
    report.pass_records = pipeline.records
    if not pipeline.converged:
        report.notes.append("pass pipeline stopped at its round cap before converging")
    report.stage("passes", clock)

    clock = time.perf_counter()
    data = load_calibration(calibration, loaded.inputs)
    ranges = collect_ranges(model, plan.activation_tensors(), data, method=calib_method, percentile=percentile)
    report.notes.append(f"calibrated {len(ranges)} tensors on {data.num_samples} samples ({calib_method})")
    report.stage("calibration", clock)

    clock = time.perf_counter()
    qparams = choose_qparams(model, plan, ranges, preset)
    report.qparams = qparams
    report.stage("scales", clock)

    clock = time.perf_counter()
    try:
        qdq_result = InsertQDQ(plan, qparams)(model)
    except PassError as exc:
        raise _in_file(source_name, exc) from None
    qdq_model = qdq_result.model
    for inst in instruments:
        record = PassRecord(len(pipeline.records) + 1, 1, InsertQDQ.name, len(model.graph.node),
                            len(qdq_model.graph.node), True, qdq_result.changes, time.perf_counter() - clock)
        report.pass_records.append(record)
        inst.after_pass(record, qdq_model)
        inst.finish(report.pass_records)
    report.stage("qdq", clock)

    clock = time.perf_counter()
    metadata = {"source": source_name, "target": preset.name, "bits": str(bits),
                "multiplier_bits": str(preset.multiplier_bits), "calibration": calib_method,
                "qlower": __version__}
    try:
        program = lower_program(model, plan, qparams, preset, metadata)
    except CompileError as exc:
        raise _in_file(source_name, exc) from None
    report.program = program
    report.stage("lowering", clock)
    return CompileResult(program, qdq_model, loaded.model, model, plan, qparams, preset, report, dict(loaded.inputs))

