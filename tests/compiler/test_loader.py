"""Stage 1 (load and check) on tiny models built with onnx.helper: each refusal names the file,
the node or input, and what to do; each repair (opset upgrade, static inputs) is noted and keeps
the numbers."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from compiler import loader
from compiler.errors import CompileError
from compiler.loader import load_model, parse_input_shape

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------ builders


def _weights(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _mlp(input_dims=("N", 3), opset=13, weights_as_inputs=False, ir_version=None) -> onnx.ModelProto:
    """x[N,3] -> MatMul W[3,4] -> Add b[4] -> Relu -> y[N,4]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b"], ["add"], name="bias"),
        helper.make_node("Relu", ["add"], ["y"], name="relu"),
    ]
    inits = [_weights("W", 3, 4), _weights("b", 4)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits]
    out_dims = [input_dims[0], 4]
    graph = helper.make_graph(
        nodes, "mlp", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)], inits
    )
    kwargs = {"ir_version": ir_version} if ir_version else {}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


def _point_to_external(tensor: TensorProto, location: str) -> None:
    """Make an in-memory tensor claim its data lives in ``location`` (nothing is written)."""
    external_data_helper.set_external_data(tensor, location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _all_static(model: onnx.ModelProto) -> bool:
    values = list(model.graph.value_info) + list(model.graph.output)
    known = {
        v.name for v in values
        if v.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }
    return all(out in known for node in model.graph.node for out in node.output)


@pytest.fixture
def no_external_reads(monkeypatch):
    """Fail the test if anything tries to read external tensor data."""

    def refuse(*args, **kwargs):
        raise AssertionError("external data was read")

    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", refuse)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor", refuse)
    monkeypatch.setattr(external_data_helper, "_read_external_data_bytes", refuse)


# ---------------------------------------------------------------------------------- happy paths


def test_static_model_loads_with_inputs_outputs_and_no_notes(tmp_path):
    path = _save(_mlp(input_dims=(2, 3)), tmp_path / "mlp.onnx")
    loaded = load_model(path)
    assert loaded.path == path
    assert loaded.inputs == {"x": ((2, 3), np.dtype(np.float32))}
    assert loaded.outputs == ["y"]
    assert loaded.notes == []
    assert _all_static(loaded.model)


def test_model_proto_is_copied_not_edited():
    model = _mlp()
    before = model.SerializeToString()
    loaded = load_model(model, batch_size=1)
    assert loaded.path is None
    assert model.SerializeToString() == before
    assert loaded.inputs["x"][0] == (1, 3)


def test_symbolic_batch_fixed_by_batch_size(tmp_path):
    loaded = load_model(_save(_mlp(), tmp_path / "m.onnx"), batch_size=4)
    assert loaded.inputs["x"][0] == (4, 3)
    assert "input 'x' dim 0 'N' fixed to 4" in loaded.notes
    out = loaded.model.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [4, 4]
    assert _all_static(loaded.model)


def test_symbolic_batch_fixed_by_input_shapes(tmp_path):
    loaded = load_model(_save(_mlp(), tmp_path / "m.onnx"), input_shapes={"x": (2, 3)})
    assert loaded.inputs["x"][0] == (2, 3)
    assert "input 'x' dim 0 'N' fixed to 2" in loaded.notes
    assert _all_static(loaded.model)


def test_stale_stored_shapes_are_recomputed_after_fixing_the_batch(tmp_path):
    """Exported at batch 1, then made dynamic by a tool that left value_info and the output at 1."""
    model = _mlp(input_dims=("N", 3))
    model.graph.value_info.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, [1, 4]))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    loaded = load_model(_save(model, tmp_path / "m.onnx"), batch_size=4)
    out = loaded.model.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [4, 4]
    assert any("recomputed them from the graph" in note for note in loaded.notes)
    assert _all_static(loaded.model)


def test_batch_size_does_not_override_a_static_dim(tmp_path):
    loaded = load_model(_save(_mlp(input_dims=(1, 3)), tmp_path / "m.onnx"), batch_size=8)
    assert loaded.inputs["x"][0] == (1, 3)
    assert any("batch size 8 not applied" in note for note in loaded.notes)


def test_old_file_listing_weights_as_inputs_has_only_the_real_input(tmp_path):
    model = _mlp(input_dims=(1, 3), opset=9, weights_as_inputs=True, ir_version=3)
    assert [i.name for i in model.graph.input] == ["x", "W", "b"]
    loaded = load_model(_save(model, tmp_path / "old.onnx"))
    assert list(loaded.inputs) == ["x"]
    assert [i.name for i in loaded.model.graph.input] == ["x"]
    assert loaded.model.ir_version >= 7
    assert "opset 9 upgraded to 13" in loaded.notes
    assert any("2 weight(s) listed as graph inputs" in note for note in loaded.notes)
    onnx.checker.check_model(loaded.model, full_check=True)


def test_opset_11_model_upgraded_to_13_computes_the_same(tmp_path):
    """Split, Unsqueeze, Squeeze and ReduceMean take attributes at 11 and inputs at 13; the
    upgraded model must compute the same numbers (same kernels, so atol 1e-6, rtol 0)."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "wb"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Split", ["r"], ["s0", "s1"], name="split", axis=1, split=[2, 2]),
        helper.make_node("Add", ["s0", "s1"], ["a"], name="add"),
        helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ReduceMean", ["p"], ["m"], name="mean", axes=[3], keepdims=1),
        helper.make_node("Flatten", ["m"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], name="fc", transB=1),
        helper.make_node("Unsqueeze", ["g"], ["u"], name="unsqueeze", axes=[0]),
        helper.make_node("Squeeze", ["u"], ["q"], name="squeeze", axes=[0]),
        helper.make_node("Softmax", ["q"], ["y"], name="softmax", axis=1),
    ]
    inits = [_weights("w", 4, 3, 3, 3), _weights("wb", 4), _weights("fw", 5, 8), _weights("fb", 5)]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    loaded = load_model(_save(model, tmp_path / "cnn11.onnx"), batch_size=2)

    assert "opset 11 upgraded to 13" in loaded.notes
    assert loaded.model.opset_import[0].version == 13
    assert _all_static(loaded.model)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    (before,) = _run(model, {"x": x})
    (after,) = _run(loaded.model, {"x": x})
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)


def test_opset13_reshape_fed_by_shape_chain_gets_static_shapes(tmp_path):
    """The PyTorch flatten (Shape -> Gather -> Unsqueeze -> Concat -> Reshape): opset-13
    inference cannot see through it, so the loader borrows the shapes from opset 14."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="flatten"),
        helper.make_node("Relu", ["flat"], ["y"], name="relu"),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    graph = helper.make_graph(
        nodes,
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "F"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    loaded = load_model(_save(model, tmp_path / "flat.onnx"), batch_size=2)
    assert loaded.model.opset_import[0].version == 13
    assert _all_static(loaded.model)
    out = loaded.model.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [2, 12]
    assert any("opset-14 inference" in note for note in loaded.notes)


def test_local_functions_are_inlined(tmp_path):
    function = helper.make_function(
        "local", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
        opset_imports=[helper.make_opsetid("", 13)],
    )
    graph = helper.make_graph(
        [helper.make_node("MyRelu", ["x"], ["y"], name="call", domain="local")],
        "fn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(
        graph, functions=[function],
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)],
    )
    loaded = load_model(_save(model, tmp_path / "fn.onnx"))
    assert [n.op_type for n in loaded.model.graph.node] == ["Relu"]
    assert "inlined 1 model-local function(s)" in loaded.notes


# ------------------------------------------------------------------------------- not a model


def test_missing_file(tmp_path):
    with pytest.raises(CompileError, match=r"'.*nothere\.onnx' does not exist"):
        load_model(tmp_path / "nothere.onnx")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(CompileError, match="is not a file"):
        load_model(tmp_path)


def test_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(CompileError, match=r"'.*x\.txt' is not an ONNX model \(protobuf parse failed"):
        load_model(path)


def test_empty_file_is_not_onnx(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(CompileError, match=r"'.*empty\.onnx' is not an ONNX model \(it has no graph nodes\)"):
        load_model(path)


# ------------------------------------------------------------------------------- external data


def test_external_data_inside_the_folder_loads(tmp_path):
    model = _mlp(input_dims=(1, 3))
    expected = numpy_helper.to_array(model.graph.initializer[0])
    path = str(tmp_path / "ext.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    assert os.path.getsize(tmp_path / "ext.weights") > 0
    loaded = load_model(path)
    weight = next(i for i in loaded.model.graph.initializer if i.name == "W")
    assert not external_data_helper.uses_external_data(weight)
    np.testing.assert_array_equal(numpy_helper.to_array(weight), expected)
    assert any("external data of 2 tensor(s) from 'ext.weights'" in note for note in loaded.notes)


def _model_pointing_outside(tmp_path, location: str) -> str:
    """A model in tmp_path/model/ whose weight 'W' claims to live at ``location``; a real file
    exists at tmp_path/outside.bin, so a refusal cannot be a "file not found"."""
    (tmp_path / "outside.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    (tmp_path / "model").mkdir()
    model = _mlp(input_dims=(1, 3))
    _point_to_external(model.graph.initializer[0], location)
    return _save(model, tmp_path / "model" / "m.onnx")


def test_external_data_dotdot_escape_refused_without_reading(tmp_path, no_external_reads):
    path = _model_pointing_outside(tmp_path, "../outside.bin")
    with pytest.raises(CompileError) as err:
        load_model(path)
    message = str(err.value)
    assert "m.onnx" in message and "tensor 'W'" in message and "'../outside.bin'" in message
    assert "outside the model's folder" in message


def test_external_data_absolute_path_refused_without_reading(tmp_path, no_external_reads):
    target = str(tmp_path / "outside.bin")
    path = _model_pointing_outside(tmp_path, target)
    with pytest.raises(CompileError, match=rf"tensor 'W' location '{target}' is an absolute path"):
        load_model(path)


def test_external_data_symlink_escape_refused_without_reading(tmp_path, no_external_reads):
    path = _model_pointing_outside(tmp_path, "link.bin")
    os.symlink(tmp_path / "outside.bin", tmp_path / "model" / "link.bin")
    with pytest.raises(CompileError, match=r"tensor 'W' location 'link.bin' resolves outside"):
        load_model(path)


def test_external_data_of_constant_node_is_checked_too(tmp_path, no_external_reads):
    (tmp_path / "outside.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    (tmp_path / "model").mkdir()
    value = numpy_helper.from_array(np.ones(4, np.float32), "const_value")
    _point_to_external(value, "../outside.bin")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], name="const", value=value),
         helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "const",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                 tmp_path / "model" / "c.onnx")
    with pytest.raises(CompileError, match=r"tensor 'const_value' location '../outside.bin'"):
        load_model(path)


def test_external_data_missing_file_inside_folder(tmp_path):
    model = _mlp(input_dims=(1, 3))
    _point_to_external(model.graph.initializer[0], "gone.bin")
    path = _save(model, tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=r"tensor 'W' location 'gone.bin' does not exist"):
        load_model(path)


def test_in_memory_model_with_external_data_is_refused():
    model = _mlp(input_dims=(1, 3))
    _point_to_external(model.graph.initializer[0], "w.bin")
    with pytest.raises(CompileError, match=r"in-memory model 'mlp'.*'W' -> 'w.bin'.*pass the model's file path"):
        load_model(model)


# ---------------------------------------------------------------------------- checker and ops


def test_checker_failure_is_reported_with_the_node(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x"], ["y"], name="lonely_gemm")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "bad.onnx")
    with pytest.raises(CompileError, match=r"'.*bad\.onnx': the ONNX checker rejects the model: .*lonely_gemm"):
        load_model(path)


@pytest.mark.parametrize("opset, what", [(2, "older than the oldest supported"), (24, "newer than the newest")])
def test_opset_out_of_range(tmp_path, opset, what):
    path = _save(_mlp(input_dims=(1, 3), opset=opset), tmp_path / f"op{opset}.onnx")
    with pytest.raises(CompileError, match=rf"op{opset}\.onnx': opset {opset} is {what}.*re-export"):
        load_model(path)


def test_vendor_domain_nodes_are_named(tmp_path):
    nodes = [
        helper.make_node("FusedConv", ["x", "w"], ["c"], name="fused1", domain="com.microsoft"),
        helper.make_node("Gelu", ["c"], ["y"], name="gelu1", domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes, "ms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [_weights("w", 2, 3, 3, 3)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    )
    with pytest.raises(CompileError) as err:
        load_model(_save(model, tmp_path / "ms.onnx"))
    message = str(err.value)
    assert "ms.onnx" in message
    assert "node 'fused1' (FusedConv) in domain 'com.microsoft'" in message
    assert "node 'gelu1' (Gelu) in domain 'com.microsoft'" in message


def test_opset_upgrade_failure_names_the_node(tmp_path, monkeypatch):
    """The converter covers every valid small graph tried, so its failure is simulated with the
    message onnx gives for an op it has no adapter for."""
    graph = helper.make_graph(
        [helper.make_node("Upsample", ["x", "scales"], ["y"], name="up1", mode="nearest")],
        "up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), tmp_path / "up.onnx")

    def fail(model, version):
        raise RuntimeError("BaseConverter.h:66: adapter_lookup: No Adapter From Version $9 for Upsample")

    monkeypatch.setattr(loader.version_converter, "convert_version", fail)
    with pytest.raises(CompileError) as err:
        load_model(path)
    message = str(err.value)
    assert "up.onnx" in message and "could not upgrade opset 9 to 13 at node 'up1' (Upsample)" in message
    assert "re-export the model at opset 13 or newer" in message


# -------------------------------------------------------------------------------------- inputs


def test_leftover_symbolic_dim_names_input_and_dim(tmp_path):
    path = _save(_mlp(input_dims=("N", "C")), tmp_path / "m.onnx")
    with pytest.raises(CompileError) as err:
        load_model(path, batch_size=1)
    message = str(err.value)
    assert "m.onnx" in message
    assert "input 'x' dim 1 'C' not static" in message
    assert "--input-shape x:1xC" in message


def test_unknown_input_name(tmp_path):
    path = _save(_mlp(), tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=r"names 'image', which is not an input of the model; the inputs are 'x'"):
        load_model(path, input_shapes={"image": (1, 3)})


def test_weight_name_given_as_input(tmp_path):
    path = _save(_mlp(), tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=r"names 'W', which is a weight, not an input"):
        load_model(path, input_shapes={"W": (3, 4)})


def test_given_shape_contradicting_a_static_dim(tmp_path):
    path = _save(_mlp(), tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=r"input 'x' dim 1 is 3 in the model, but --input-shape gives 5"):
        load_model(path, input_shapes={"x": (1, 5)})


def test_given_shape_with_wrong_rank(tmp_path):
    path = _save(_mlp(), tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=r"input 'x' has rank 2 \(Nx3\), but --input-shape gives rank 3"):
        load_model(path, input_shapes={"x": (1, 3, 1)})


def test_non_float_input_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], name="cast", to=TensorProto.FLOAT)],
        "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "ids.onnx")
    with pytest.raises(CompileError, match=r"ids\.onnx': input 'ids' has element type INT64; only float32"):
        load_model(path)


# ----------------------------------------------------------------------------- shape inference


def test_shape_inference_failure_after_fixing_names_the_node(tmp_path):
    """x[N, K] @ W[3, 4] passes the checker while K is symbolic; K = 5 makes the MatMul wrong."""
    path = _save(_mlp(input_dims=("N", "K")), tmp_path / "m.onnx")
    with pytest.raises(CompileError, match=r"m\.onnx': node 'matmul' \(MatMul\): shape inference failed"):
        load_model(path, input_shapes={"x": (1, 5)})


def test_every_node_without_a_static_shape_is_listed(tmp_path):
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("Greater", ["x", "zero"], ["positive"], name="greater"),
        helper.make_node("Compress", ["x", "positive"], ["kept"], name="compress", axis=0),
    ]
    graph = helper.make_graph(
        nodes, "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, [1, "K"]),
         helper.make_tensor_value_info("kept", TensorProto.FLOAT, ["M"])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "dyn.onnx")
    with pytest.raises(CompileError) as err:
        load_model(path)
    message = str(err.value)
    assert "dyn.onnx" in message and "2 tensor(s) without a static shape" in message
    assert "node 'nonzero' (NonZero) -> 'nz'" in message
    assert "node 'compress' (Compress) -> 'kept'" in message
    assert "greater" not in message


# ------------------------------------------------------------------------------------- weights


def test_non_finite_weights_are_listed_with_counts(tmp_path):
    model = _mlp(input_dims=(1, 3))
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    w[0, 0], w[1, 1] = np.nan, np.nan
    b = np.array([0.0, np.inf, -np.inf, 1.0], np.float32)
    del model.graph.initializer[:]
    model.graph.initializer.extend([numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    with pytest.raises(CompileError) as err:
        load_model(_save(model, tmp_path / "nan.onnx"))
    message = str(err.value)
    assert "nan.onnx" in message and "2 tensor(s) hold NaN or Inf" in message
    assert "'W' (2 NaN, 0 Inf of 12)" in message
    assert "'b' (0 NaN, 2 Inf of 4)" in message


# --------------------------------------------------------------------------- parse_input_shape


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:1x3x224x224", ("data", (1, 3, 224, 224))),
        ("data:1,3,8,8", ("data", (1, 3, 8, 8))),
        ("input:0:1x10", ("input:0", (1, 10))),
        (" x : 2X3 ", ("x", (2, 3))),
    ],
)
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["data", "data:", ":1x3", "data:1xax3", "data:1x-3", "data:1x0x3", "data:1xx3"])
def test_parse_input_shape_rejects_bad_syntax(text):
    with pytest.raises(CompileError, match=r"--input-shape '.*'"):
        parse_input_shape(text)


# ------------------------------------------------------------ the same checks, without copies


def _big_model() -> onnx.ModelProto:
    """Conv with a 4608-weight kernel, a Shape -> Gather -> Concat -> Reshape flatten (the target
    comes from data propagation), a MatMul with a 2560-element weight stored as float_data, a
    sparse initializer nothing reads, and doc strings / metadata on the model."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [512, 5],
                            rng.standard_normal(2560).astype(np.float32).tolist())  # float_data, not raw
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["p"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["p", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc"),
    ]
    inits = [w, fc, numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits,
                              doc_string="a graph doc string")
    graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(3, np.float32), "sp"),
        numpy_helper.from_array(np.array([0, 5, 9], np.int64), "sp_idx"), [10]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], doc_string="model doc " * 50,
                              producer_name="test")
    helper.set_model_props(model, {"author": "qlower tests", "notes": "x" * 300})
    return model


def test_size_bound_is_above_the_serialized_size_and_close_to_it():
    model = _big_model()
    exact = model.ByteSize()
    bound = loader._size_bound(model)
    assert exact <= bound <= exact + 200  # one raw tensor over 4 KB: 16 + 64 + 11 * 4 bytes of slack
    small = _mlp()
    assert loader._size_bound(small) == small.ByteSize()  # nothing large: measured exactly


def test_size_check_uses_the_bound(monkeypatch):
    model = _big_model()
    monkeypatch.setattr(loader, "_MAX_PROTO_BYTES", model.ByteSize() - 1)
    with pytest.raises(CompileError, match="larger than 2 GB"):
        load_model(model, batch_size=1)
    monkeypatch.setattr(loader, "_MAX_PROTO_BYTES", loader._size_bound(model))
    assert load_model(model, batch_size=1).model.graph.node


def test_shapes_match_strict_inference_on_the_whole_model(tmp_path):
    model = _big_model()
    loaded = load_model(_save(model, tmp_path / "big.onnx"), batch_size=2)
    # the reference: onnx's own strict inference (with data propagation) on the whole model,
    # weights included, with the batch fixed by hand
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    whole = onnx.shape_inference.infer_shapes(whole, check_type=True, strict_mode=True, data_prop=True)
    assert [v.SerializeToString() for v in loaded.model.graph.value_info] == \
        [v.SerializeToString() for v in whole.graph.value_info]
    assert loaded.model.graph.output[0].SerializeToString() == whole.graph.output[0].SerializeToString()
    assert [d.dim_value for d in loaded.model.graph.output[0].type.tensor_type.shape.dim] == [2, 5]
    # the weights are the file's, byte for byte
    assert [i.SerializeToString() for i in loaded.model.graph.initializer] == \
        [i.SerializeToString() for i in model.graph.initializer]
    x = RNG.standard_normal((2, 16, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(loaded.model, {"x": x})[0], _run(model, {"x": x})[0])


def test_checker_reads_the_file_bytes_unless_the_model_changed(tmp_path, monkeypatch):
    seen = []
    real = onnx.checker.check_model

    def spy(model, *args, **kwargs):
        seen.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    path = _save(_mlp(("N", 3)), tmp_path / "plain.onnx")
    load_model(path, batch_size=1)
    assert seen == ["bytes"]
    with open(path, "rb") as f:
        assert onnx.load_model_from_string(f.read()) == onnx.load_model(path)
    # external data read into the model: the file no longer describes it, the model is checked
    model = _mlp(("N", 3))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(model, str(ext / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    seen.clear()
    load_model(str(ext / "m.onnx"), batch_size=1)
    assert seen == ["ModelProto"]
