"""Small helpers for editing an ONNX graph through producer/consumer links.

Passes work on ``onnx.ModelProto`` directly (onnx-graphsurgeon drops node ``metadata_props``,
which carry the fusion annotations, so it is not used inside the pipeline).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

META_PREFIX = "qlower."


class GraphIndex:
    """Producer, consumers and constants of every tensor name in a graph (a snapshot: rebuild it
    after editing). Consumers include nodes that read a tensor from inside a subgraph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            # An If/Loop/Scan whose body reads an outer tensor is one of its consumers too (it
            # does not list the name in node.input); dead-code removal must see that read.
            for inp in sorted(subgraph_reads(node)):
                self.consumers.setdefault(inp, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return constant_node_value(node)
        return None

    def uses(self, name: str) -> int:
        """Readers of a tensor, counting a graph output as one."""
        return len(self.consumers.get(name, [])) + (1 if name in self.graph_outputs else 0)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node, whichever attribute form it uses."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise ValueError(f"Constant node '{node.name}' has no supported value attribute")


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def get_meta(node: onnx.NodeProto, key: str) -> str | None:
    """A ``qlower.<key>`` annotation of a node (node metadata_props, shown by Netron)."""
    for entry in node.metadata_props:
        if entry.key == META_PREFIX + key:
            return entry.value
    return None


def set_meta(node: onnx.NodeProto, key: str, value: str) -> None:
    for entry in node.metadata_props:
        if entry.key == META_PREFIX + key:
            entry.value = value
            return
    entry = node.metadata_props.add()
    entry.key = META_PREFIX + key
    entry.value = value


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 1


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """The model's real inputs: graph inputs that are not initializers (old files list weights too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def replace_all_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` (nodes and graph outputs) read ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def remove_nodes(graph: onnx.GraphProto, doomed: list[onnx.NodeProto]) -> None:
    """Delete nodes in place (references to the surviving nodes stay valid)."""
    ids = {id(n) for n in doomed}
    for i in reversed(range(len(graph.node))):
        if id(graph.node[i]) in ids:
            del graph.node[i]


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_1``, ``base_2``, ... whichever is not taken yet; records the choice."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer}
    names |= {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


# --- additions for the cleanup, folding and fusion passes -------------------------------------


# The standard ops whose schemas take graph attributes; any other standard op holding one fails
# the ONNX checker, so only these (and ops of other domains) need their attributes searched.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan/SequenceMap bodies)."""
    if node.op_type not in _SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
        return []  # (called for every node by GraphIndex: skip the attribute scan)
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensor names a node reads from inside its subgraphs (implicit inputs)."""
    reads: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {i.name for i in g.initializer}
        defined |= {i.values.name for i in g.sparse_initializer}
        used = {o.name for o in g.output}
        for inner in g.node:
            defined.update(o for o in inner.output if o)
            used.update(i for i in inner.input if i)
            used |= subgraph_reads(inner)
        reads |= used - defined
    return reads


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads: its inputs and its subgraphs' outer-scope names."""
    return {i for i in node.input if i} | subgraph_reads(node)


def replace_input_uses(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Make every node that reads ``old`` (also from inside subgraphs) read ``new``. Graph outputs
    are left alone: a graph output keeps its name, so rewire its producer instead
    (``rename_output``). Returns how many inputs were rewritten."""
    count = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
                count += 1
        for g in subgraphs(node):
            if not _defines(g, old):
                count += replace_input_uses(g, old, new)
                for out in g.output:
                    if out.name == old:
                        out.name = new
                        count += 1
    return count


def _defines(g: onnx.GraphProto, name: str) -> bool:
    if any(i.name == name for i in g.input) or any(i.name == name for i in g.initializer):
        return True
    return any(name in n.output for n in g.node)


def rename_output(graph: onnx.GraphProto, node: onnx.NodeProto, old: str, new: str) -> None:
    """Rename output ``old`` of ``node`` to ``new`` and make its readers follow (the producer is
    rewired; a graph output named ``new`` keeps its name and is now produced by ``node``)."""
    for i, name in enumerate(node.output):
        if name == old:
            node.output[i] = new
    replace_input_uses(graph, old, new)


def del_meta(node: onnx.NodeProto, key: str) -> bool:
    """Remove a ``qlower.<key>`` annotation; True if there was one."""
    for i, entry in enumerate(node.metadata_props):
        if entry.key == META_PREFIX + key:
            del node.metadata_props[i]
            return True
    return False


def nodes_by_name(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in graph.node if n.name}


_RAW_DTYPES = {np.dtype(t): onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t)) for t in (
    np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
    np.int64, np.uint64, np.bool_)}


def add_initializer(model: onnx.ModelProto, name: str, value: np.ndarray | onnx.TensorProto) -> onnx.TensorProto:
    """Add an initializer (models of IR version < 4 also list it as a graph input, as the
    checker requires there)."""
    array = None if isinstance(value, onnx.TensorProto) else np.asarray(value)
    if array is not None and array.dtype in _RAW_DTYPES:
        # numpy_helper.from_array's tensor, built in its place (appending a built tensor copies it)
        tensor = model.graph.initializer.add()
        tensor.dims.extend(array.shape)
        tensor.name = name
        tensor.data_type = _RAW_DTYPES[array.dtype]
        tensor.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    else:
        if array is None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = name
        else:
            tensor = numpy_helper.from_array(array, name)
        model.graph.initializer.append(tensor)
        tensor = model.graph.initializer[-1]
    if model.ir_version and model.ir_version < 4:
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return tensor


def remove_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove initializers (dense and sparse) and their graph-input entries, if any. Entries are
    deleted where they stand: rebuilding the list (``del [:]`` then ``extend``) would copy every
    surviving weight, the whole model's data for one removed tensor."""
    if not names:
        return
    graph = model.graph
    delete_where(graph.initializer, lambda i: i.name in names)
    delete_where(graph.sparse_initializer, lambda i: i.values.name in names)
    delete_where(graph.input, lambda i: i.name in names)


def delete_where(container, doomed) -> int:
    """Delete the entries of a repeated protobuf field for which ``doomed(entry)`` is true, in
    place and in order (the survivors are not copied, and references to them stay valid);
    returns how many were deleted."""
    count = 0
    for i in reversed(range(len(container))):
        if doomed(container[i]):
            del container[i]
            count += 1
    return count


class TensorInfo:
    """Element type and shape of a tensor as shape inference sees it (``None`` dims are
    unknown; ``shape`` None means even the rank is unknown)."""

    __slots__ = ("elem_type", "shape")

    def __init__(self, elem_type: int, shape: tuple[int | None, ...] | None):
        self.elem_type = elem_type
        self.shape = shape

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def static(self) -> bool:
        return self.shape is not None and all(d is not None for d in self.shape)

    def __repr__(self) -> str:
        return f"TensorInfo({onnx.TensorProto.DataType.Name(self.elem_type)}, {self.shape})"


def without_large_weights(model: onnx.ModelProto, max_elements: int = 1024) -> onnx.ModelProto:
    """A copy for shape inference in which large initializers are graph inputs of the same type
    and shape: inference needs their shapes, not their values (only small integer tensors such as
    Reshape targets feed data propagation), and copying weights dominates its cost."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, dst = model.graph, light.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    dst.sparse_initializer.extend(src.sparse_initializer)
    declared = {i.name for i in src.input}
    for init in src.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= max_elements:
            dst.initializer.append(init)
        elif init.name not in declared:
            dst.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if light.ir_version and light.ir_version < 4:
        light.ir_version = 4  # large weights are now plain inputs; small ones need not be listed
    return light


def infer_tensor_info(model: onnx.ModelProto) -> tuple[dict[str, TensorInfo], str | None]:
    """Element type and shape of every tensor ONNX shape inference (with data propagation) can
    work out, plus initializers. Returns ``(info, error)``: when inference fails, ``info`` holds
    only what the model declares and ``error`` says why."""
    error = None
    try:
        light = without_large_weights(model)
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 (inference is best effort; the caller reports the reason)
        inferred, error = model, f"shape inference failed: {exc}".splitlines()[0]
    g = inferred.graph
    info: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type
        if not t.HasField("tensor_type"):
            continue
        tt = t.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        info[vi.name] = TensorInfo(tt.elem_type, shape)
    for init in g.initializer:
        info[init.name] = TensorInfo(init.data_type, tuple(init.dims))
    return info, error


def drop_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> set[str]:
    """Remove those of ``candidates`` that are initializers nothing reads any more (a pass tidying
    up the weights it replaced); returns the names removed."""
    index = GraphIndex(model.graph)
    doomed = {name for name in candidates if name in index.initializers and not index.uses(name)}
    remove_initializers(model, doomed)
    return doomed


def drop_stale_value_info(graph: onnx.GraphProto) -> int:
    """Remove value_info entries of tensors that no node, input or initializer defines any more;
    return how many were dropped."""
    existing = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    existing |= {i.name for i in graph.initializer}
    return delete_where(graph.value_info, lambda vi: vi.name not in existing)
