"""Pass dumps: the ONNX model after every pass (opens in Netron) and a one-line summary each.

``DumpInstrument`` is a hook outside the passes (as TVM's instruments are): give it to the
PassManager and it writes ``NN_<pass name>.onnx`` after each pass run, NN being the run's index,
and ``summary.txt`` when the pipeline finishes. Models over the 2 GB protobuf limit are out of
scope (onnx.save cannot write them in one file).
"""
from __future__ import annotations

import re
from pathlib import Path

import onnx

from passes.base import Instrument, PassRecord, PassResult

SUMMARY_FILE = "summary.txt"


def dump_file_name(record: PassRecord) -> str:
    """``NN_<pass name>.onnx``, the pass name made safe for a file name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", record.name) or "pass"
    return f"{record.index:02d}_{safe}.onnx"


def record_step(instruments, index: int, round_no: int, name: str, nodes_before: int, result: PassResult,
                seconds: float) -> PassRecord:
    """A pass run outside the PassManager (the QDQ import before the pipeline, the QDQ boundary
    fix-up and QDQ insertion after it) as a ``PassRecord``, handed to every instrument as the
    pipeline's own runs are: ``--dump-dir`` gets its model file and its summary line."""
    record = PassRecord(index, round_no, name, nodes_before, len(result.model.graph.node), result.modified,
                        list(result.changes), seconds)
    for inst in instruments:
        inst.after_pass(record, result.model)
    return record


class DumpInstrument(Instrument):
    """Write the model after every pass into ``dump_dir`` (created if missing) and a summary at
    the end. ``written`` lists the files in the order they were written."""

    def __init__(self, dump_dir: str | Path):
        self.dump_dir = Path(dump_dir)
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def after_pass(self, record: PassRecord, model: onnx.ModelProto) -> None:
        path = self.dump_dir / dump_file_name(record)
        onnx.save(model, str(path))
        self.written.append(path)

    def finish(self, records: list[PassRecord]) -> None:
        rounds = max((r.round for r in records), default=0)
        if records:
            nodes = f"nodes {records[0].nodes_before} -> {records[-1].nodes_after}"
        else:
            nodes = "no passes run"
        header = f"# qlower pass dump: {len(records)} pass runs in {rounds} rounds, {nodes}"
        lines = [header] + [r.summary_line() for r in records]
        path = self.dump_dir / SUMMARY_FILE
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.written.append(path)
