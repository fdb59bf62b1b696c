"""Stage 1, load and check: turn an ONNX file into a model the later stages can rely on.

After ``load_model`` the model has passed the ONNX checker, uses only standard ONNX ops at a
default-domain opset in [13, 23] (3..12 are upgraded to 13 by the version converter), has float32 inputs with static
shapes, a static shape on every tensor (the lowering sizes every buffer), no weight listed as a
graph input, and only finite float weights. Anything else is a ``CompileError`` naming the file,
the node or input, and what to do.

External data is read only from files inside the model's folder, and only after every location
has been checked. Nothing is ever unpickled: the model is protobuf, tensors are raw bytes.
"""
from __future__ import annotations

import ntpath
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper, shape_inference, version_converter

from passes.graph import (
    graph_input_names,
    opset_version,
    subgraphs,
    without_large_weights,
)

from .errors import CompileError

MIN_OPSET = 3  # Caffe2-era zoo files; the version converter upgrades them
MAX_OPSET = 23
TARGET_OPSET = 13  # older models are upgraded to this
_SHAPE_HELPER_OPSET = 14  # Reshape's inference reads Shape-chain values from opset 14 on
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit; larger models cannot be checked or serialized
_DEFAULT_DOMAINS = ("", "ai.onnx")
_SUPPORTED_INPUT_TYPES = (onnx.TensorProto.FLOAT,)
_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
)
_MAX_LISTED = 20  # items listed in one error message before "... and N more"


@dataclass
class LoadedModel:
    """A checked model with static shapes, and what was done to it on the way."""

    model: onnx.ModelProto
    path: str | None
    inputs: dict[str, tuple[tuple[int, ...], np.dtype]]  # real inputs only, in graph order
    outputs: list[str]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- public API


def load_model(
    model_or_path: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int | None = None,
) -> LoadedModel:
    """Load, check and make static an ONNX model (stage 1).

    ``input_shapes`` sets whole input shapes by name (``--input-shape``); ``batch_size`` sets a
    symbolic dim 0 of the inputs not named there. A ModelProto argument is copied, not edited.
    """
    notes: list[str] = []
    file_bytes = None  # the file's protobuf bytes while the model is still exactly what they encode
    if isinstance(model_or_path, onnx.ModelProto):
        path = None
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        where = f"in-memory model '{model.graph.name or '?'}'"
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        where = f"'{path}'"
        model, file_bytes = _read_model_file(path, where)
    else:
        raise TypeError(
            f"load_model takes a path or an onnx.ModelProto, not {type(model_or_path).__name__}"
        )

    _check_not_empty(model, where)
    if _load_external_data(model, path, where, notes):
        file_bytes = None
    _check_size(model, where)
    if model.functions:
        file_bytes = None
    model = _inline_local_functions(model, where, notes)
    _check_domains(model, where)
    _check_opset_range(model, where)
    _run_checker(model, where, file_bytes)
    del file_bytes
    model = _upgrade_opset(model, where, notes)
    _raise_ir_version(model, notes)
    _drop_initializers_from_inputs(model, notes)
    _check_input_types(model, where)
    _fix_input_shapes(model, input_shapes or {}, batch_size, where, notes)
    model = _infer_static_shapes(model, where, notes)
    _check_finite_weights(model, where)
    return LoadedModel(model, path, _input_table(model), [o.name for o in model.graph.output], notes)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--input-shape NAME:1x3x224x224`` (``1,3,224,224`` also works) into (name, shape).

    The name is everything before the last colon, so TensorFlow-style names like ``input:0``
    work.
    """
    name, sep, dims_text = text.strip().rpartition(":")
    dims = re.split(r"[x,]", dims_text.strip().lower()) if dims_text.strip() else []
    if not sep or not name.strip() or not dims or not all(re.fullmatch(r"\s*[0-9]+\s*", d) for d in dims):
        raise CompileError(
            f"--input-shape '{text}': expected NAME:DIMS with positive integer dims, "
            "such as 'data:1x3x224x224'"
        )
    shape = tuple(int(d) for d in dims)
    if any(d <= 0 for d in shape):
        raise CompileError(f"--input-shape '{text}': every dim must be positive, got {_fmt_shape(shape)}")
    return name.strip(), shape


# ------------------------------------------------------------------------------ reading the file


def _read_model_file(path: str, where: str) -> tuple[onnx.ModelProto, bytes]:
    """Parse the protobuf without touching external data (that is checked before it is read);
    returns the model and the file's bytes (the checker reads them instead of a re-serialization)."""
    if not os.path.exists(path):
        raise CompileError(f"{where} does not exist")
    if not os.path.isfile(path):
        raise CompileError(f"{where} is not a file; give the path of a .onnx model file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        return onnx.load_model_from_string(data, format="protobuf"), data
    except DecodeError as exc:
        raise CompileError(f"{where} is not an ONNX model (protobuf parse failed: {exc})") from exc
    except OSError as exc:
        raise CompileError(f"{where} cannot be read: {exc}") from exc


def _check_not_empty(model: onnx.ModelProto, where: str) -> None:
    """Arbitrary bytes often parse as an empty protobuf message; a graph without nodes is not a model."""
    if not model.graph.node:
        raise CompileError(f"{where} is not an ONNX model (it has no graph nodes)")


def _check_size(model: onnx.ModelProto, where: str) -> None:
    if _size_bound(model) > _MAX_PROTO_BYTES:
        raise CompileError(
            f"{where}: the model with its weights is larger than 2 GB, which the ONNX checker "
            "and shape inference cannot handle (and no target of this kind can hold)"
        )


def _size_bound(model: onnx.ModelProto) -> int:
    """An upper bound of ``model.ByteSize()``, off by a few dozen bytes per weight, without
    serializing the weights (protobuf's ByteSize encodes the whole model: 0.15 s for ResNet-50's
    100 MB). Everything but the initializers holding over 4 KB of ``raw_data`` is measured exactly
    on a skeleton copy; each of those adds its data size and an allowance for its other fields."""
    small, large = [], 0
    for tensor in model.graph.initializer:
        raw = len(tensor.raw_data)  # (reading a bytes field copies it: read it once)
        if raw > 4096:
            large += _raw_tensor_size_bound(tensor, raw)
        else:
            small.append(tensor)
    if not large:
        return model.ByteSize()
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    skeleton.graph.initializer.extend(small)
    return skeleton.ByteSize() + 16 + large


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except the one named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _raw_tensor_size_bound(tensor: onnx.TensorProto, raw_bytes: int) -> int:
    """Encoded size of a raw_data TensorProto inside a graph, from above: its data, name and doc
    string, 11 bytes per dim, and 64 bytes of field tags, lengths and data type (the typed data
    fields are counted at their widest encodings in case one is set besides raw_data)."""
    numbers = 4 * len(tensor.float_data) + 8 * len(tensor.double_data)
    numbers += 10 * (len(tensor.int32_data) + len(tensor.int64_data) + len(tensor.uint64_data))
    numbers += sum(len(v) + 16 for v in tensor.string_data)
    numbers += sum(len(e.key) + len(e.value) + 32 for e in tensor.external_data)
    return raw_bytes + len(tensor.name) + len(tensor.doc_string) + 11 * len(tensor.dims) + numbers + 64


# ------------------------------------------------------------------------------- external data


def _load_external_data(model: onnx.ModelProto, path: str | None, where: str, notes: list[str]) -> bool:
    """Read external tensor data, but only after every location is known to stay in the model's
    folder; True if there was any (the model then differs from its file)."""
    external = [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]
    if not external:
        return False
    if path is None:
        raise CompileError(
            f"{where}: {len(external)} tensor(s) keep their data in external files "
            f"({_external_list(external)}) and an in-memory model has no folder to find them in; "
            "pass the model's file path instead"
        )
    base_dir = os.path.dirname(os.path.abspath(path))
    problems = [p for p in (_external_location_problem(t, base_dir) for t in external) if p]
    if problems:
        raise CompileError(
            f"{where}: cannot use external data: {_join_limited(problems)}; "
            f"external data must be files inside the model's folder '{base_dir}'"
        )
    files = sorted({_external_location(t) for t in external})
    try:
        external_data_helper.load_external_data_for_model(model, base_dir)
        for tensor in _all_tensors(model):  # tensors onnx's loader does not visit (sparse ones)
            if external_data_helper.uses_external_data(tensor):
                external_data_helper.load_external_data_for_tensor(tensor, base_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CompileError(f"{where}: cannot read external data: {exc}") from exc
    notes.append(f"read external data of {len(external)} tensor(s) from {', '.join(repr(f) for f in files)}")
    return True


def _external_location_problem(tensor: onnx.TensorProto, base_dir: str) -> str | None:
    """Why this tensor's data location is unsafe or unusable, or None when it is fine.

    Absolute paths, ``..`` and symlinks that lead out of the folder are all caught by comparing
    real paths; nothing is opened.
    """
    location = _external_location(tensor)
    label = f"tensor '{tensor.name}' location '{location}'"
    if not location or "\x00" in location:
        return f"{label} is not a usable file name"
    if os.path.isabs(location) or ntpath.isabs(location) or ntpath.splitdrive(location)[0]:
        return f"{label} is an absolute path"
    real_base = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(base_dir, location))
    if real == real_base or os.path.commonpath([real, real_base]) != real_base:
        return f"{label} resolves outside the model's folder (to '{real}')"
    if not os.path.isfile(real):
        return f"{label} does not exist"
    return None


def _external_list(tensors: list[onnx.TensorProto]) -> str:
    items = [f"'{t.name}' -> '{_external_location(t)}'" for t in tensors]
    return _join_limited(items)


def _external_location(tensor: onnx.TensorProto) -> str:
    """The ``location`` entry of a tensor's external data, read without onnx's parsing of the
    other entries (which can raise on a bad offset before the location was even looked at)."""
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, sparse initializers and node attributes,
    in the main graph, its subgraphs and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


# ------------------------------------------------------------------------------ ops and opsets


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _inline_local_functions(model: onnx.ModelProto, where: str, notes: list[str]) -> onnx.ModelProto:
    """Calls to model-local functions (newer PyTorch exports) become the plain ONNX ops they
    stand for, so the op checks and the passes see a flat graph."""
    if not model.functions:
        return model
    count = len(model.functions)
    try:
        model = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # C++ inliner; any failure means the functions cannot be flattened
        raise CompileError(f"{where}: could not inline the model's local functions: {_clean(exc)}") from exc
    notes.append(f"inlined {count} model-local function(s)")
    return model


def _check_domains(model: onnx.ModelProto, where: str) -> None:
    """Only standard ONNX ops can be lowered; vendor ops (com.microsoft fusions, ...) cannot."""
    foreign = [n for n in _all_nodes(model.graph) if n.domain not in _DEFAULT_DOMAINS]
    if foreign:
        items = [f"{_node_label(n)} in domain '{n.domain}'" for n in foreign]
        raise CompileError(
            f"{where}: only standard ONNX ops are supported, found {len(foreign)} other op(s): "
            f"{_join_limited(items)}; export the model without vendor-specific fusions "
            "(for example save it before onnxruntime's graph optimizations)"
        )


def _check_opset_range(model: onnx.ModelProto, where: str) -> None:
    if not any(op.domain in _DEFAULT_DOMAINS for op in model.opset_import):
        raise CompileError(f"{where}: the model declares no ONNX opset (opset_import has no default domain)")
    version = opset_version(model)
    if version < MIN_OPSET:
        raise CompileError(
            f"{where}: opset {version} is older than the oldest supported ({MIN_OPSET}); "
            f"re-export the model at opset {TARGET_OPSET} or newer"
        )
    if version > MAX_OPSET:
        raise CompileError(
            f"{where}: opset {version} is newer than the newest supported ({MAX_OPSET}); "
            f"re-export the model at an opset between {TARGET_OPSET} and {MAX_OPSET}"
        )


def _run_checker(model: onnx.ModelProto, where: str, file_bytes: bytes | None = None) -> None:
    """onnx's checker with full_check (which adds strict shape inference on the model as given).
    ``file_bytes``: the protobuf bytes the model was parsed from, when nothing has changed it
    since; the checker then reads them instead of serializing the model again (0.15 s for
    ResNet-50's 100 MB; both encode the same message)."""
    try:
        onnx.checker.check_model(model if file_bytes is None else file_bytes, full_check=True)
    except (onnx.checker.ValidationError, shape_inference.InferenceError) as exc:
        raise CompileError(f"{where}: the ONNX checker rejects the model: {_clean(exc)}") from exc


def _upgrade_opset(model: onnx.ModelProto, where: str, notes: list[str]) -> onnx.ModelProto:
    """Bring opsets 3..12 up to 13, so later stages see one form of Clip, Resize, Split, ..."""
    version = opset_version(model)
    if version >= TARGET_OPSET:
        return model
    # Caffe2-era files (IR 3) list every initializer as an input; the converter adds new
    # initializers (Pad's pads, Clip's bounds) that are not, which only IR 4+ allows.
    model.ir_version = max(model.ir_version, 4)
    legacy_resize = _legacy_resize_modes(model, version, where)
    try:
        upgraded = version_converter.convert_version(model, TARGET_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the C++ converter raises several types; all mean "could not convert"
        culprit = _node_in_message(str(exc), model.graph)
        at = f" at {culprit}" if culprit else ""
        raise CompileError(
            f"{where}: could not upgrade opset {version} to {TARGET_OPSET}{at}: {_clean(exc)}; "
            f"re-export the model at opset {TARGET_OPSET} or newer"
        ) from exc
    notes.append(f"opset {version} upgraded to {TARGET_OPSET}")
    for node in upgraded.graph.node:
        if node.op_type == "Resize" and node.output[0] in legacy_resize:
            for name, value in legacy_resize[node.output[0]].items():
                node.attribute.append(onnx.helper.make_attribute(name, value))
    return upgraded


def _legacy_resize_modes(model: onnx.ModelProto, version: int, where: str) -> dict[str, dict[str, str]]:
    """Output name -> the Resize-11 attributes that keep an Upsample (opset < 10) or Resize-10
    meaning what it meant: asymmetric coordinates, and for nearest onnxruntime's old rule
    (truncate when upsampling = floor, ceil when downsampling). onnx's version converter leaves
    them out, so the upgraded node would use half_pixel and round_prefer_floor instead."""
    if version >= 11:
        return {}
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    modes = {}
    for node in model.graph.node:
        if node.op_type not in ("Upsample", "Resize"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        wanted = {"coordinate_transformation_mode": "asymmetric"}
        if mode == "nearest":
            scales = attrs.get("scales")
            if scales is None and len(node.input) > 1:
                scales = constants.get(node.input[1])
            scales = [1.0] if scales is None else [float(v) for v in np.asarray(scales).reshape(-1)]
            if min(scales) < 1.0 < max(scales):
                raise CompileError(f"{where}: node '{node.name}' ({node.op_type}) mixes up- and downsampling "
                                   f"(scales {scales}) in opset {version}'s nearest rule; re-export at opset 11 or newer")
            wanted["nearest_mode"] = "ceil" if min(scales) < 1.0 else "floor"
        modes[node.output[0]] = wanted
    return modes


def _raise_ir_version(model: onnx.ModelProto, notes: list[str]) -> None:
    """The version converter leaves ir_version alone; raise it to what the opset needs
    (IR 4+ is also what lets weights stop being graph inputs)."""
    needed = onnx.helper.find_min_ir_version_for(
        [op for op in model.opset_import if op.domain in _DEFAULT_DOMAINS], ignore_unknown=True
    )
    if model.ir_version < needed:
        notes.append(f"IR version {model.ir_version} raised to {needed} to match the opset")
        model.ir_version = needed


def _drop_initializers_from_inputs(model: onnx.ModelProto, notes: list[str]) -> None:
    """Old exporters list every weight as a graph input too, which makes weights overridable
    (onnxruntime then will not fold them); keep only the real inputs."""
    real = set(graph_input_names(model))
    dropped = len(model.graph.input) - len(real)
    if dropped:
        keep = [value for value in model.graph.input if value.name in real]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        notes.append(f"{dropped} weight(s) listed as graph inputs are no longer inputs")


# ----------------------------------------------------------------------------------- the inputs


def _check_input_types(model: onnx.ModelProto, where: str) -> None:
    for value in model.graph.input:
        if not value.type.HasField("tensor_type"):
            raise CompileError(
                f"{where}: input '{value.name}' is not a tensor; only tensor inputs are supported"
            )
        elem = value.type.tensor_type.elem_type
        if elem not in _SUPPORTED_INPUT_TYPES:
            raise CompileError(
                f"{where}: input '{value.name}' has element type "
                f"{onnx.TensorProto.DataType.Name(elem)}; only float32 inputs are supported for now"
            )


def _fix_input_shapes(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int | None,
    where: str,
    notes: list[str],
) -> None:
    """Make every input dim static: named shapes first, then the batch size for a symbolic dim 0."""
    inputs = {value.name: value for value in model.graph.input}
    unknown = [name for name in input_shapes if name not in inputs]
    if unknown:
        weights = {init.name for init in model.graph.initializer}
        kind = "a weight, not an input" if unknown[0] in weights else "not an input of the model"
        raise CompileError(
            f"{where}: --input-shape names '{unknown[0]}', which is {kind}; "
            f"the inputs are {', '.join(repr(n) for n in inputs)}"
        )
    if batch_size is not None and batch_size <= 0:
        raise CompileError(f"{where}: batch size must be positive, got {batch_size}")
    for name, value in inputs.items():
        if name in input_shapes:
            _apply_given_shape(value, tuple(input_shapes[name]), where, notes)
        elif batch_size is not None:
            _apply_batch_size(value, batch_size, notes)
    _check_inputs_static(list(inputs.values()), where)


def _apply_given_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...], where: str, notes: list[str]) -> None:
    tensor_type = value.type.tensor_type
    if any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
        raise CompileError(f"{where}: --input-shape for '{value.name}' must be positive integers, got {shape}")
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        if len(dims) != len(shape):
            raise CompileError(
                f"{where}: input '{value.name}' has rank {len(dims)} ({_fmt_dims(dims)}), "
                f"but --input-shape gives rank {len(shape)} ({_fmt_shape(shape)})"
            )
        for i, (dim, size) in enumerate(zip(dims, shape)):
            if _is_known_input_dim(dim) and dim.dim_value != size:
                raise CompileError(
                    f"{where}: input '{value.name}' dim {i} is {dim.dim_value} in the model, "
                    f"but --input-shape gives {size} ({_fmt_dims(dims)} vs {_fmt_shape(shape)})"
                )
    else:
        tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in shape)
        notes.append(f"input '{value.name}' had no shape; set to {_fmt_shape(shape)}")
    for i, (dim, size) in enumerate(zip(tensor_type.shape.dim, shape)):
        if not _is_known_input_dim(dim):
            if dim.dim_param or dim.HasField("dim_value"):
                notes.append(f"input '{value.name}' dim {i} '{_dim_text(dim)}' fixed to {size}")
            dim.dim_value = size  # clears dim_param (a oneof)


def _apply_batch_size(value: onnx.ValueInfoProto, batch_size: int, notes: list[str]) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return
    if _is_known_input_dim(dims[0]):
        if dims[0].dim_value != batch_size:
            notes.append(
                f"input '{value.name}' dim 0 is fixed at {dims[0].dim_value} by the model; "
                f"batch size {batch_size} not applied"
            )
        return
    notes.append(f"input '{value.name}' dim 0 '{_dim_text(dims[0])}' fixed to {batch_size}")
    dims[0].dim_value = batch_size


def _check_inputs_static(inputs: list[onnx.ValueInfoProto], where: str) -> None:
    """One error for every input dim still unknown, with the flag that would fix it."""
    problems, batch_hint = [], ""
    for value in inputs:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            problems.append(
                f"input '{value.name}' has no shape (unknown rank); give it with --input-shape {value.name}:..."
            )
            continue
        dims = tensor_type.shape.dim
        loose = [f"dim {i} '{_dim_text(d)}'" for i, d in enumerate(dims) if not _is_known_input_dim(d)]
        if dims and not _is_known_input_dim(dims[0]):
            batch_hint = " (a symbolic dim 0 can also be set with --batch-size N)"
        if loose:
            template = "x".join(str(d.dim_value) if _is_known_input_dim(d) else (d.dim_param or "?") for d in dims)
            problems.append(
                f"input '{value.name}' {', '.join(loose)} not static; "
                f"give its size with --input-shape {value.name}:{template}"
            )
    if problems:
        raise CompileError(
            f"{where}: every input shape must be static: {'; '.join(problems)}{batch_hint}"
        )


def _is_known_input_dim(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """Some exporters write 0 or -1 for "unknown"; an input dim counts only when positive."""
    return dim.HasField("dim_value") and dim.dim_value > 0


def _input_table(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    table = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value for d in tensor_type.shape.dim)
        table[value.name] = (shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
    return table


# ----------------------------------------------------------------------------- shape inference


def _infer_static_shapes(model: onnx.ModelProto, where: str, notes: list[str]) -> onnx.ModelProto:
    """Strict shape inference from the now-static inputs; every node output must end up static."""
    model = _infer_shapes_past_stale_hints(model, where, notes)
    if _nodes_without_static_shape(model) and opset_version(model) < _SHAPE_HELPER_OPSET:
        model = _borrow_shapes_from_newer_opset(model, where, notes)
    missing = _nodes_without_static_shape(model)
    if missing:
        items = [f"{_node_label(node)} -> '{out}'" for node, out in missing]
        raise CompileError(
            f"{where}: shape inference left {len(missing)} tensor(s) without a static shape, "
            f"and the lowering needs one for every tensor: {_join_limited(items)}; "
            "these shapes depend on the data or on ops shape inference does not cover; simplify "
            "the model with its input shapes fixed (e.g. onnxsim) or remove the data-dependent ops"
        )
    return model


def _infer_shapes_strict(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    try:
        return _strict_inference(model)
    except _INFERENCE_ERRORS as exc:
        raise _inference_failure(exc, model, where) from exc


def _infer_shapes_past_stale_hints(model: onnx.ModelProto, where: str, notes: list[str]) -> onnx.ModelProto:
    """Strict inference from the fixed inputs. Intermediate and output shapes stored in the file
    are only hints, and after fixing a batch they are often stale (a model exported at batch 1
    and made dynamic by a tool); if they conflict, infer once more without them."""
    try:
        return _strict_inference(model)
    except _INFERENCE_ERRORS as exc:
        first_failure = exc
    del model.graph.value_info[:]  # (the failed inference left the model as it was)
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        inferred = _strict_inference(model)
    except _INFERENCE_ERRORS as exc:
        raise _inference_failure(exc, model, where) from exc
    notes.append(
        "shapes stored in the model disagree with the fixed inputs "
        f"({_clean(first_failure)}); recomputed them from the graph"
    )
    return inferred


_INFERENCE_ERRORS = (shape_inference.InferenceError, onnx.checker.ValidationError)


def _strict_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict ONNX shape inference (types checked, data propagated); returns ``model`` itself with
    what inference found written in (value_info, graph input and output types, the value_info of
    subgraphs), or raises and leaves it as it was.

    Inference runs on ``without_large_weights(model)``: the weights over 1024 elements are typed
    graph inputs there, as inference needs their shapes and not their values (small integer
    tensors such as Reshape targets stay initializers for data propagation). Inference on the
    whole model serializes and parses every weight, 0.27 s of ResNet-50's 0.3 s."""
    light = without_large_weights(model)
    inferred = shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True).graph
    graph = model.graph
    del graph.value_info[:]
    graph.value_info.extend(inferred.value_info)
    for mine, found in zip(graph.input, inferred.input):  # the light graph's extra inputs come last
        mine.CopyFrom(found)
    for mine, found in zip(graph.output, inferred.output):
        mine.CopyFrom(found)
    for mine, found in zip(graph.node, inferred.node):
        if subgraphs(mine):
            mine.CopyFrom(found)
    return model


def _inference_failure(exc: BaseException, model: onnx.ModelProto, where: str) -> CompileError:
    culprit = _node_in_message(str(exc), model.graph)
    at = f"{culprit}: " if culprit else ""
    return CompileError(
        f"{where}: {at}shape inference failed with the fixed input shapes: {_clean(exc)}; "
        "check the input shapes against what the model expects"
    )


def _borrow_shapes_from_newer_opset(model: onnx.ModelProto, where: str, notes: list[str]) -> onnx.ModelProto:
    """At opset 13, Reshape's inference cannot read a target shape computed by a Shape chain
    (a common PyTorch flatten); from opset 14 it can. Infer on an opset-14 copy and keep the
    static shapes it finds for tensors still unknown here, then re-check them strictly."""
    try:
        newer = version_converter.convert_version(model, _SHAPE_HELPER_OPSET)
        newer = _strict_inference(newer)
    except Exception:  # noqa: BLE001 (only a helper view: if it fails, the unknown shapes are reported as they are)
        return model
    known = {v.name: v for v in _value_infos(newer) if _is_static_value(v)}
    borrowed = [known[out] for _, out in _nodes_without_static_shape(model) if out in known]
    if not borrowed:
        return model
    outputs = {o.name: o for o in model.graph.output}
    for value in borrowed:
        target = outputs.get(value.name)
        if target is not None:
            target.type.CopyFrom(value.type)
        else:
            model.graph.value_info.append(value)
    notes.append(
        f"{len(borrowed)} shape(s) that opset-{opset_version(model)} inference cannot see "
        f"(Reshape fed by Shape) taken from opset-{_SHAPE_HELPER_OPSET} inference"
    )
    return _infer_shapes_strict(model, where)


def _nodes_without_static_shape(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, output name) for every top-level node output with no fully static tensor shape."""
    static = {v.name for v in _value_infos(model) if _is_static_value(v)}
    static |= {init.name for init in model.graph.initializer}
    return [(node, out) for node in model.graph.node for out in node.output if out and out not in static]


def _value_infos(model: onnx.ModelProto) -> Iterator[onnx.ValueInfoProto]:
    yield from model.graph.input
    yield from model.graph.value_info
    yield from model.graph.output


def _is_static_value(value: onnx.ValueInfoProto) -> bool:
    """A tensor whose every dim is a number (0 is a real size here, e.g. Shape of a scalar)."""
    tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
    return (
        tensor_type is not None
        and tensor_type.HasField("shape")
        and all(d.HasField("dim_value") and d.dim_value >= 0 for d in tensor_type.shape.dim)
    )


# -------------------------------------------------------------------------------------- weights


def _check_finite_weights(model: onnx.ModelProto, where: str) -> None:
    """NaN or Inf in a weight has no integer scale; report every such tensor at once."""
    bad = []
    for init in model.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(init)
        if values.dtype.kind != "f":  # bfloat16 comes back as an ml_dtypes type
            values = values.astype(np.float32)
        if np.isfinite(values).all():  # (one pass over the common case; count only when needed)
            continue
        n_nan = int(np.isnan(values).sum())
        n_inf = int(np.isinf(values).sum())
        if n_nan or n_inf:
            bad.append(f"'{init.name}' ({n_nan} NaN, {n_inf} Inf of {values.size})")
    if bad:
        raise CompileError(
            f"{where}: weights must be finite; {len(bad)} tensor(s) hold NaN or Inf: "
            f"{_join_limited(bad)}; fix the training or export that produced them"
        )


# -------------------------------------------------------------------------------------- messages


_NODE_IN_MESSAGE = re.compile(r"\(op_type:\s*([\w.]+),\s*node name:\s*([^)]*)\)")


def _node_in_message(message: str, graph: onnx.GraphProto) -> str | None:
    """The node an onnx error message is about: its ``(op_type:X, node name: Y)`` tag, else the
    nodes whose op type the message mentions as a word ("No Adapter ... for Scan")."""
    match = _NODE_IN_MESSAGE.search(message)
    if match:
        op_type, name = match.group(1), match.group(2).strip()
        return f"node '{name}' ({op_type})" if name else f"a {op_type} node"
    words = set(re.findall(r"\w+", message))
    nodes = [n for n in graph.node if n.op_type in words]
    if nodes:
        return _join_limited([_node_label(n) for n in nodes], limit=5)
    return None


def _node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return f"node '{node.name}' ({node.op_type})"
    first_output = next((o for o in node.output if o), "?")
    return f"unnamed {node.op_type} node writing '{first_output}'"


def _clean(exc: BaseException) -> str:
    """An onnx error message on one line, cut to its first node error: shape inference goes on
    after a failure and reports every node downstream too ("Input 0 expected to have type but
    instead is null"), which only hides the cause."""
    message = " ".join(str(exc).split())
    tags = list(_NODE_IN_MESSAGE.finditer(message))
    if len(tags) < 2:
        return message
    first = message[tags[0].end():tags[1].start()].strip(" :;")
    return f"{first} (and {len(tags) - 1} more error(s) after it)"


def _join_limited(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... and {len(items) - limit} more"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _fmt_dims(dims) -> str:
    return "x".join(_dim_text(d) for d in dims) or "scalar"


def _dim_text(dim: onnx.TensorShapeProto.Dimension) -> str:
    """A dim as the model writes it: its number, its symbolic name, or '?'."""
    if dim.HasField("dim_value"):
        return str(dim.dim_value)
    return dim.dim_param or "?"
