"""Activation fusion: mark an activation that the accelerator applies as a clamp on its producer.

Fusion annotates, it does not delete: the producer gets ``qlower.fused_activation = <activation
name>`` and the activation ``qlower.fused_into = <producer name>`` (node metadata_props). The
graph stays an ordinary ONNX graph that onnxruntime runs and Netron shows with the annotations;
QDQ insertion puts the output Q after the activation, and the lowering turns the pair into one IR
layer whose clamp bounds come from ``activation_bounds``.

The patterns are a table (``PATTERNS``) of (producer op types, activation op types, check), tried
in the written order; a check returns None when the pair fuses, otherwise its reason.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .base import GraphPass, PassResult
from .elementwise_fusion import in_chain
from .errors import PassError
from .graph import GraphIndex, del_meta, get_attr, get_meta, nodes_by_name, set_meta

FUSED_ACTIVATION = "fused_activation"
FUSED_INTO = "fused_into"

# Clip's attribute-form defaults (opset < 11) are float32's limits: treated as "no bound".
_FLOAT_LIMIT = float(np.finfo(np.float32).max)

Check = Callable[[onnx.NodeProto, onnx.NodeProto, GraphIndex], "str | None"]


def fused_activation_of(node: onnx.NodeProto) -> str | None:
    """Name of the activation fused into ``node`` (a producer), or None."""
    return get_meta(node, FUSED_ACTIVATION)


def is_fused_activation(node: onnx.NodeProto) -> bool:
    """True when ``node`` is an activation fused into its producer."""
    return get_meta(node, FUSED_INTO) is not None


def fused_groups(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Producer name -> its fused activation node, for every consistent annotation pair."""
    by_name = nodes_by_name(model.graph)
    groups = {}
    for node in model.graph.node:
        act_name = fused_activation_of(node)
        act = by_name.get(act_name) if act_name else None
        if act is not None and get_meta(act, FUSED_INTO) == node.name:
            groups[node.name] = act
    return groups


def _bound(value: float | None) -> float | None:
    if value is None or abs(value) >= _FLOAT_LIMIT:
        return None
    return float(value)


def activation_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float | None, float | None]:
    """The clamp an activation applies, as (low, high); None is unbounded.

    Relu -> (0, None). Clip -> (min, max) from attributes (opset < 11; float32's limits, the
    defaults, count as unbounded) or from constant inputs 1 and 2 (opset >= 11; an absent input is
    unbounded). A Clip bound that is not a constant is a PassError.
    """
    if node.op_type == "Relu":
        return 0.0, None
    if node.op_type != "Clip":
        raise PassError("not a clamping activation (Relu or Clip)", node=node.name, op_type=node.op_type)
    if len(node.input) > 1:
        bounds: list[float | None] = []
        for role, k in (("min", 1), ("max", 2)):
            if len(node.input) <= k or not node.input[k]:
                bounds.append(None)
                continue
            value = index.constant(node.input[k])
            if value is None:
                raise PassError(f"Clip {role} '{node.input[k]}' is not a constant",
                                node=node.name, op_type=node.op_type)
            bounds.append(_bound(float(np.asarray(value).reshape(-1)[0])))
        return bounds[0], bounds[1]
    return _bound(get_attr(node, "min")), _bound(get_attr(node, "max"))


# -- checks ------------------------------------------------------------------------------------


def sole_reader(producer: onnx.NodeProto, act: onnx.NodeProto, index: GraphIndex) -> str | None:
    """The producer's output must be read by the activation alone and not be a graph output."""
    out = producer.output[0]
    if act.input[0] != out:
        return f"{act.op_type} does not read output 0 of the {producer.op_type}"
    if out in index.graph_outputs:
        return f"{producer.op_type.lower()} output '{out}' is a graph output"
    others = [c.name for c in index.consumers.get(out, []) if c is not act]
    if others:
        return f"{producer.op_type.lower()} output also read by {', '.join(repr(n) for n in others)}"
    return None


def constant_clip_bounds(producer: onnx.NodeProto, act: onnx.NodeProto, index: GraphIndex) -> str | None:
    """A Clip fuses only with constant bounds (they become the layer's integer clamp)."""
    reason = sole_reader(producer, act, index)
    if reason:
        return reason
    for role, k in (("min", 1), ("max", 2)):
        if len(act.input) > k and act.input[k] and index.constant(act.input[k]) is None:
            return f"Clip {role} '{act.input[k]}' is not a constant"
    return None


@dataclass(frozen=True)
class FusionPattern:
    name: str
    producers: tuple[str, ...]
    activations: tuple[str, ...]
    check: Check


LINEAR_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")

PATTERNS: tuple[FusionPattern, ...] = (
    FusionPattern("relu", LINEAR_PRODUCERS, ("Relu",), sole_reader),
    FusionPattern("clip", LINEAR_PRODUCERS, ("Clip",), constant_clip_bounds),
)


def _match(producer: onnx.NodeProto, act: onnx.NodeProto) -> FusionPattern | None:
    for pattern in PATTERNS:
        if producer.op_type in pattern.producers and act.op_type in pattern.activations:
            return pattern
    return None


class FuseActivations(GraphPass):
    """Annotate every (producer, activation) pair of ``PATTERNS`` that passes its check; list the
    candidates that do not fuse, with the reason. Annotations that no longer hold (the graph
    changed under them) are dropped first, so the pass can run again after any other pass."""

    name = "fuse_activations"

    def requires(self, model: onnx.ModelProto) -> None:
        """Annotations refer to nodes by name: every node needs a unique one (run NameNodes)."""
        seen: set[str] = set()
        for node in model.graph.node:
            if not node.name or node.name in seen:
                what = "has no name" if not node.name else "shares its name with another node"
                raise self.fail(f"{what}; fusion annotations refer to nodes by name (run NameNodes first)", node)
            seen.add(node.name)

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        index = GraphIndex(graph)
        changes: list[str] = []
        stale = self._drop_stale(model, index)
        if stale:
            changes.append(f"dropped {stale} stale fusion annotations")
        fused: dict[str, int] = {}
        unfused: list[str] = []
        for act in graph.node:
            if act.domain not in ("", "ai.onnx") or not act.input:
                continue
            producer = index.producer.get(act.input[0])
            if producer is None or producer.domain not in ("", "ai.onnx"):
                continue
            pattern = _match(producer, act)
            if pattern is None or in_chain(producer) or in_chain(act):
                continue  # a lookup-table chain (elementwise_fusion) owns both nodes
            reason = pattern.check(producer, act, index)
            pair = f"{producer.op_type} '{producer.name}' + {act.op_type} '{act.name}'"
            if reason:
                unfused.append(f"{pair} not fused: {reason}")
                continue
            if fused_activation_of(producer) == act.name and get_meta(act, FUSED_INTO) == producer.name:
                continue  # already fused
            set_meta(producer, FUSED_ACTIVATION, act.name)
            set_meta(act, FUSED_INTO, producer.name)
            key = f"{producer.op_type}+{act.op_type}"
            fused[key] = fused.get(key, 0) + 1
        if fused:
            detail = ", ".join(f"{k} x{n}" for k, n in sorted(fused.items()))
            changes.append(f"fused {sum(fused.values())} activations ({detail})")
        return PassResult(model, bool(fused or stale), changes + unfused)

    def _drop_stale(self, model: onnx.ModelProto, index: GraphIndex) -> int:
        """Remove annotations whose pair no longer fuses; returns how many nodes lost one."""
        by_name = nodes_by_name(model.graph)
        dropped = 0
        for node in model.graph.node:
            act_name = fused_activation_of(node)
            if act_name is not None:
                act = by_name.get(act_name)
                ok = (act is not None and get_meta(act, FUSED_INTO) == node.name
                      and act.input and index.producer.get(act.input[0]) is node
                      and _match(node, act) is not None and _match(node, act).check(node, act, index) is None)
                if not ok:
                    dropped += del_meta(node, FUSED_ACTIVATION)
                    if act is not None and get_meta(act, FUSED_INTO) == node.name:
                        dropped += del_meta(act, FUSED_INTO)
            prod_name = get_meta(node, FUSED_INTO)
            if prod_name is not None:
                prod = by_name.get(prod_name)
                if prod is None or fused_activation_of(prod) != node.name:
                    dropped += del_meta(node, FUSED_INTO)
        return dropped

    def ensures(self, model: onnx.ModelProto) -> None:
        by_name = nodes_by_name(model.graph)
        for node in model.graph.node:
            act_name = fused_activation_of(node)
            if act_name is not None:
                act = by_name.get(act_name)
                if act is None or get_meta(act, FUSED_INTO) != node.name:
                    raise self.fail(f"annotated with fused activation '{act_name}', which does not "
                                    "point back", node)
