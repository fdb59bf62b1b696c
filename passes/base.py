"""Pass infrastructure: a pass does one job on an ONNX model and says whether it changed it.

``GraphPass.__call__`` checks the pass's cheap pre-condition (``requires``), runs it on a copy
of the model (or on the model itself with ``in_place=True``), and checks its post-condition
(``ensures``). ``PassManager`` runs passes in a written order, repeating the whole list until a
round changes nothing, at most ``max_rounds`` rounds (an uncapped ``while changed`` loop is how
pipelines hang). It copies the model once and runs every pass in place on that copy: a copy per
pass run costs a full duplicate of the weights each time (about 15 ms for ResNet-50's 100 MB, 27
times per compile) and nothing reads the intermediate models except instruments, which see each
one before the next pass runs. Instruments (dumps, timers) are hooks outside the passes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import onnx

from .errors import PassError


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    changes: list[str] = field(default_factory=list)


class GraphPass:
    """Base class: subclasses set ``name`` and implement ``apply`` (which may edit its argument:
    a private copy, or the caller's model when run with ``in_place=True``)."""

    name: str = "pass"

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise PassError if the model is not what this pass expects."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise PassError if the pass did not establish what it promises."""

    def apply(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def fail(self, message: str, node: onnx.NodeProto | None = None) -> PassError:
        return PassError(message, node=node.name if node is not None else None,
                         op_type=node.op_type if node is not None else None, pass_name=self.name)

    def __call__(self, model: onnx.ModelProto, *, in_place: bool = False) -> PassResult:
        """Run the pass. By default ``model`` is left as it was and the result is a new model;
        ``in_place=True`` edits ``model`` itself (no copy; the result's model is usually the same
        object, and ``model`` is undefined if the pass raises)."""
        self.requires(model)
        if in_place:
            work = model
        else:
            work = onnx.ModelProto()
            work.CopyFrom(model)
        result = self.apply(work)
        self.ensures(result.model)
        return result


@dataclass
class PassRecord:
    """What one pass run did: the line in the dump summary."""

    index: int
    round: int
    name: str
    nodes_before: int
    nodes_after: int
    modified: bool
    changes: list[str]
    seconds: float

    def summary_line(self) -> str:
        what = "; ".join(self.changes) if self.changes else "no change"
        return (f"{self.index:02d} {self.name:<24} round {self.round} nodes {self.nodes_before:>4} -> "
                f"{self.nodes_after:<4} {self.seconds * 1000:8.1f} ms  {what}")


class Instrument:
    """A hook called after every pass run (dumps, logging). ``after_pass`` gets the pipeline's
    working model, which the next pass edits in place: an instrument that wants to keep it must
    write or copy it there and then (as DumpInstrument writes its file)."""

    def after_pass(self, record: PassRecord, model: onnx.ModelProto) -> None:
        pass

    def finish(self, records: list[PassRecord]) -> None:
        pass


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    records: list[PassRecord]
    converged: bool


class PassManager:
    """Runs ``passes`` in order, round after round until nothing changes (at most ``max_rounds``).
    The model given to ``run`` is not edited: it is copied once and the passes edit the copy."""

    def __init__(self, passes: list[GraphPass], max_rounds: int = 4, instruments: tuple[Instrument, ...] = ()):
        self.passes = list(passes)
        self.max_rounds = max_rounds
        self.instruments = tuple(instruments)

    def run(self, model: onnx.ModelProto) -> PipelineResult:
        records: list[PassRecord] = []
        converged = False
        work = onnx.ModelProto()
        work.CopyFrom(model)
        model = work
        for round_no in range(1, self.max_rounds + 1):
            changed = False
            for p in self.passes:
                before = len(model.graph.node)
                start = time.perf_counter()
                result = p(model, in_place=True)
                seconds = time.perf_counter() - start
                model = result.model
                record = PassRecord(len(records) + 1, round_no, p.name, before, len(model.graph.node),
                                    result.modified, result.changes, seconds)
                records.append(record)
                for inst in self.instruments:
                    inst.after_pass(record, model)
                changed |= result.modified
            if not changed:
                converged = True
                break
        for inst in self.instruments:
            inst.finish(records)
        return PipelineResult(model, records, converged)
