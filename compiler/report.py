"""The compile report: what each stage did and took, the passes, the layers and their scales."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from passes.base import PassRecord
from passes.qparams import QParamTable
from passes.targets import TargetPreset
from runtime.ir import Program


@dataclass
class CompileReport:
    source: str
    target: TargetPreset
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    pass_records: list[PassRecord] = field(default_factory=list)
    qparams: QParamTable | None = None
    program: Program | None = None
    offload: object | None = None  # compiler.offload.OffloadReport: integer vs float layers, and why

    def stage(self, name: str, started: float) -> None:
        self.stage_seconds[name] = time.perf_counter() - started

    @property
    def total_seconds(self) -> float:
        return sum(self.stage_seconds.values())

    def layer_lines(self) -> list[str]:
        if self.program is None:
            return []
        lines = []
        for layer in self.program.layers:
            out = self.program.tensors[layer.outputs[0]]
            ins = ", ".join(f"{self.program.tensors[i].dtype}" for i in layer.inputs)
            extra = ""
            if "multiplier" in layer.params:
                m, k = layer.params["multiplier"], layer.params["shift"]
                extra = f"  m {int(m.min())}..{int(m.max())}  k {int(k.min())}..{int(k.max())}"
            if "clamp_lo" in layer.params:
                extra += f"  clamp [{int(layer.params['clamp_lo'].min())}, {int(layer.params['clamp_hi'].max())}]"
            lines.append(f"  {layer.name:<28} {layer.op:<9} {ins} -> {out.dtype}{extra}"
                         f"  ({' + '.join(layer.source_nodes)})")
        return lines

    def adjustment_lines(self) -> list[str]:
        """Scales that scale selection moved (passes.qparams.ScaleAdjustment), each with its layer,
        tensor and amount: the largest nudge, then the layers that lost weight bits to their bias
        (``bias_fit``), near-dead channels whose weight scale was raised (``dead_channel``, bits),
        Add inputs dropped because their multiplier rounds to 0 (``dropped_input``, bound in output
        steps), moved output scales (``output_nudge``), and every weight-scale nudge."""
        if self.qparams is None or not getattr(self.qparams, "adjustments", None):
            return []
        adj = self.qparams.adjustments
        lines = ["scale adjustments:",
                 (f"  largest weight-scale nudge {self.qparams.largest('nudge'):.4%} "
                  f"({sum(a.kind == 'nudge' for a in adj)} layers nudged so m/2^k is exact)")]
        order = ["bias_fit", "dead_channel", "dropped_input", "output_nudge", "nudge"]
        for kind in order:
            lines.extend(f"  {a.describe()}" for a in adj if a.kind == kind)
        lines.extend(f"  {a.describe()}" for a in adj if a.kind not in order)  # a kind added later
        return lines + [""]

    def summary(self) -> str:
        """A few lines for the console."""
        n_layers = len(self.program.layers) if self.program else 0
        ops: dict[str, int] = {}
        for layer in self.program.layers if self.program else []:
            ops[layer.op] = ops.get(layer.op, 0) + 1
        passes = [r for r in self.pass_records if r.modified]
        lines = [(f"compiled {self.source} for {self.target.name} ({self.target.weight_bits}-bit) in "
                  f"{self.total_seconds:.2f} s: {n_layers} integer layers "
                  f"({', '.join(f'{v} {k}' for k, v in sorted(ops.items()))})")]
        for r in passes:
            lines.append(f"  pass {r.name}: {'; '.join(r.changes)}")
        if self.offload is not None and self.offload.float:
            lines.append(f"  offload: {self.offload.summary()}")
        lines.extend(f"  {n}" for n in self.notes)
        adj = self.adjustment_lines()
        if adj:
            lines.append(adj[1])
            fits = [line for line in adj[2:] if "bits so the bias fits" in line]
            lines.extend(fits[:5])
            if len(fits) > 5:
                lines.append(f"  ... {len(fits) - 5} more layers lost weight bits to the bias (report.txt)")
            kinds = self.qparams.adjustments
            dead = sum(a.kind == "dead_channel" for a in kinds)
            dropped = sum(a.kind == "dropped_input" for a in kinds)
            if dead or dropped:
                lines.append(f"  {dead} layer(s) with near-dead channels raised, {dropped} Add input(s) dropped "
                             "(m = 0); details in report.txt")
        return "\n".join(lines)

    def text(self) -> str:
        parts = [f"qlower compile report: {self.source}", f"target: {self.target.name} - {self.target.description}",
                 (f"bits: weights {self.target.weight_bits}, activations {self.target.activation_bits}; "
                  f"multiplier bits {self.target.multiplier_bits}; bias {self.target.bias_dtype}"), ""]
        parts.append("stages:")
        parts.extend(f"  {k:<12} {v * 1000:9.1f} ms" for k, v in self.stage_seconds.items())
        parts.append("")
        parts.append("passes:")
        parts.extend("  " + r.summary_line() for r in self.pass_records)
        parts.append("")
        parts.append("notes:")
        parts.extend(f"  {n}" for n in self.notes)
        parts.append("")
        parts.extend(self.adjustment_lines())
        if self.offload is not None:
            parts.append(self.offload.text().rstrip("\n"))
            parts.append("")
        parts.append("layers:")
        parts.extend(self.layer_lines())
        if self.qparams is not None:
            parts.append("")
            parts.append("quantization parameters:")
            parts.extend("  " + line for line in self.qparams.describe().splitlines())
        return "\n".join(parts) + "\n"
