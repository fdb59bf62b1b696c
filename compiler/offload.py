"""The offload report: which nodes run as integer layers on the accelerator and which run as float
layers on the host, and why (TIDL's answer to an op it cannot run is to leave it on the host
and say so; qlower does the same).

Every compile writes it: in the compile report's text and as ``offload.txt`` / ``offload.json``
next to ``model.qir``. The reasons come from the layer plan: "op unsupported (no integer lowering
for X)", "unsupported form: <which attribute or input>", or "denied by --deny-list (...)".
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from passes.layer_plan import LayerPlan
from runtime.float_ops import FLOAT_OPS

from .errors import CompileError


@dataclass
class OffloadEntry:
    node: str  # the ONNX node (the group's main node)
    op: str
    kind: str  # "integer" (integer or lut layer) or "float"
    layer: str  # the IR layer's name
    reason: str = ""  # why float
    fused: list[str] = field(default_factory=list)  # nodes fused into the layer (activations)


@dataclass
class OffloadReport:
    entries: list[OffloadEntry]
    unmatched_deny: list[str] = field(default_factory=list)  # deny-list entries that matched no node

    @property
    def integer(self) -> list[OffloadEntry]:
        return [e for e in self.entries if e.kind != "float"]

    @property
    def float(self) -> list[OffloadEntry]:
        return [e for e in self.entries if e.kind == "float"]

    def float_reasons(self) -> Counter:
        """(op, reason) -> number of float layers."""
        return Counter((e.op, e.reason) for e in self.float)

    def not_lowered_ops(self) -> list[str]:
        """Op types that run in float for a reason other than the deny list."""
        return sorted({e.op for e in self.float if not e.reason.startswith("denied")})

    def summary(self) -> str:
        ops = Counter(e.op for e in self.float)
        detail = f" ({', '.join(f'{n} {op}' for op, n in sorted(ops.items()))})" if ops else ""
        return f"{len(self.integer)} integer layers, {len(self.float)} float layers on the host{detail}"

    def text(self) -> str:
        lines = [f"offload: {self.summary()}"]
        if self.float:
            lines.append("float layers by reason:")
            lines.extend(f"  {n:4d} x {op}: {reason}" for (op, reason), n in sorted(self.float_reasons().items()))
        if self.unmatched_deny:
            lines.append(f"deny-list entries that match no layer's node: {', '.join(self.unmatched_deny)} "
                         "(a Relu/Clip fused into its producer is part of that layer: deny the producer)")
        lines.append("nodes:")
        width = max([len(e.node) for e in self.entries] + [4])
        for e in self.entries:
            fused = f" (+ {', '.join(e.fused)})" if e.fused else ""
            why = f"  {e.reason}" if e.reason else ""
            lines.append(f"  {e.node:<{width}}  {e.op:<20} {e.kind:<7}{why}{fused}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({"integer_layers": len(self.integer), "float_layers": len(self.float),
                           "unmatched_deny": self.unmatched_deny,
                           "nodes": [asdict(e) for e in self.entries]}, indent=1, sort_keys=True)


def offload_report(plan: LayerPlan, deny=()) -> OffloadReport:
    """One entry per layer group of the plan (a node split into several groups appears once per group)."""
    entries = []
    for g in plan.groups:
        fused = [g.activation.name] if g.activation is not None else []
        entries.append(OffloadEntry(g.node.name, g.op_type, "float" if g.kind == "float" else "integer", g.name,
                                    g.reason or "" if g.kind == "float" else "", fused))
    names = {g.node.name for g in plan.groups} | {g.op_type for g in plan.groups}
    return OffloadReport(entries, [d for d in deny if d not in names])


def check_float_groups(plan: LayerPlan) -> None:
    """Every float group needs a float implementation: one CompileError lists every node without."""
    missing = [g for g in plan.float_groups() if g.op_type not in FLOAT_OPS]
    if missing:
        lines = "\n".join(f"  node '{g.node.name}' ({g.op_type}): {g.reason}" for g in missing)
        raise CompileError(f"{len(missing)} node(s) have neither an integer lowering nor a float implementation "
                           f"(runtime/float_ops.py):\n{lines}\nReplace these ops, or add them to runtime/float_ops.py.")
