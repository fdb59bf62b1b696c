"""The graph.py helpers the passes build on: subgraph reads, rewiring, shape info, removal."""
import numpy as np
import onnx
import pytest
from graphs import init, make_model, vi
from onnx import TensorProto, helper, numpy_helper, shape_inference

from passes.graph import (
    GraphIndex,
    add_initializer,
    del_meta,
    delete_where,
    drop_stale_value_info,
    drop_unused_initializers,
    get_meta,
    infer_tensor_info,
    remove_initializers,
    remove_nodes,
    rename_output,
    replace_input_uses,
    set_meta,
    subgraph_reads,
    subgraphs,
    without_large_weights,
)


def if_model(inner_reads="a", shadow=False):
    then_nodes = [helper.make_node("Neg", [inner_reads], ["t"], name="neg")]
    if shadow:  # the branch defines its own 'a'
        then_nodes.insert(0, helper.make_node("Constant", [], ["a"], name="ka", value_float=1.0))
    then_g = helper.make_graph(then_nodes, "then", [], [vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Abs", ["w"], ["e"], name="abs")], "else", [], [vi("e", [2])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x", [2]), vi("cond", [], TensorProto.BOOL)], [("y", [2])],
                      [("w", np.ones(2, np.float32))])


def test_subgraph_reads_and_index_consumers():
    model = if_model()
    if_node = model.graph.node[1]
    assert subgraph_reads(if_node) == {"a", "w"}
    index = GraphIndex(model.graph)
    assert [n.name for n in index.consumers["a"]] == ["if"]
    assert index.uses("w") == 1
    assert subgraph_reads(if_model(shadow=True).graph.node[1]) == {"w"}


def test_replace_input_uses_reaches_subgraphs_but_not_graph_outputs():
    model = if_model()
    assert replace_input_uses(model.graph, "a", "x") == 1
    then_g = {a.name: a.g for a in model.graph.node[1].attribute}["then_branch"]
    assert then_g.node[0].input[0] == "x"
    shadowed = if_model(shadow=True)
    assert replace_input_uses(shadowed.graph, "a", "x") == 0  # the branch's own 'a' is not ours


def test_rename_output_keeps_graph_output_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["b"], name="n")]
    model = make_model(nodes, [("x", [2])], [("b", [2])])
    rename_output(model.graph, model.graph.node[0], "a", "a2")
    assert list(model.graph.node[0].output) == ["a2"] and list(model.graph.node[1].input) == ["a2"]
    assert [o.name for o in model.graph.output] == ["b"]


def test_remove_nodes_keeps_references_valid():
    nodes = [helper.make_node("Relu", ["x"], [f"a{i}"], name=f"r{i}") for i in range(4)]
    model = make_model(nodes, [("x", [2])], [("a3", [2])])
    refs = list(model.graph.node)
    remove_nodes(model.graph, [refs[0], refs[2]])
    refs[3].name = "renamed"
    assert [n.name for n in model.graph.node] == ["r1", "renamed"]


def test_meta_round_trip():
    n = helper.make_node("Relu", ["x"], ["y"], name="r")
    set_meta(n, "k", "v")
    set_meta(n, "k", "v2")
    assert get_meta(n, "k") == "v2" and len(n.metadata_props) == 1
    assert del_meta(n, "k") and not del_meta(n, "k") and get_meta(n, "k") is None


def test_infer_tensor_info():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")]
    model = make_model(nodes, [("x", [2, "N"])], [vi("y", None)])
    info, error = infer_tensor_info(model)
    assert error is None
    assert info["x"].shape == (2, None) and not info["x"].static and info["x"].rank == 2
    assert info["s"].shape == (2,) and info["s"].static
    assert info["s"].elem_type == TensorProto.INT64


def test_add_and_drop_initializers_old_ir():
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [("x", [2])], [("y", [2])],
                       [init("w", np.ones(2, np.float32))], opset=7)
    add_initializer(model, "spare", np.zeros(2, np.float32))
    assert "spare" in {i.name for i in model.graph.input}  # IR 3 lists initializers as inputs
    assert drop_unused_initializers(model, {"spare", "w"}) == {"spare"}
    assert {i.name for i in model.graph.input} == {"x", "w"}


def many_weights_model(n=6):
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"a{i - 1}", f"w{i}"], [f"a{i}"], name=f"add{i}")
             for i in range(n)]
    inits = [init(f"w{i}", np.full(3, i, np.float32)) for i in range(n)]
    return make_model(nodes, [("x", [3])], [(f"a{n - 1}", [3])], inits)


def test_remove_initializers_deletes_in_place_keeping_order_and_references():
    model = many_weights_model()
    survivors = [t for t in model.graph.initializer if t.name in ("w1", "w3", "w4")]
    remove_initializers(model, {"w0", "w2", "w5", "not_there"})
    assert [t.name for t in model.graph.initializer] == ["w1", "w3", "w4"]
    survivors[1].name = "renamed"  # references taken before the removal still reach the graph's entry
    assert model.graph.initializer[1].name == "renamed"
    assert numpy_helper.to_array(model.graph.initializer[2]).tolist() == [4.0, 4.0, 4.0]


def test_remove_initializers_old_ir_drops_the_input_entries_and_sparse_ones():
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [("x", [2])], [("y", [2])],
                       [init("w", np.ones(2, np.float32)), init("v", np.ones(2, np.float32))], opset=7)
    sparse = helper.make_sparse_tensor(init("s", np.ones(1, np.float32)), init("s_idx", np.array([0], np.int64)), [2])
    model.graph.sparse_initializer.append(sparse)
    remove_initializers(model, {"v", "s"})
    assert [i.name for i in model.graph.input] == ["x", "w"]
    assert [i.name for i in model.graph.initializer] == ["w"] and not model.graph.sparse_initializer


def test_delete_where_counts_and_keeps_the_rest_in_order():
    model = many_weights_model(8)
    assert delete_where(model.graph.initializer, lambda t: int(t.name[1:]) % 3 == 0) == 3
    assert [t.name for t in model.graph.initializer] == ["w1", "w2", "w4", "w5", "w7"]
    assert delete_where(model.graph.initializer, lambda t: False) == 0


def test_drop_stale_value_info():
    model = many_weights_model(3)
    model.graph.value_info.extend([vi("a0", [3]), vi("gone", [3]), vi("a1", [3]), vi("gone2", [1])])
    assert drop_stale_value_info(model.graph) == 2
    assert [v.name for v in model.graph.value_info] == ["a0", "a1"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16,
                                   np.int32, np.uint32, np.int64, np.uint64, np.bool_])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_add_initializer_builds_what_from_array_builds(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    if shape:
        array = np.asfortranarray(array) if len(shape) > 1 else array[::-1]  # not C-contiguous
    model = many_weights_model(1)
    returned = add_initializer(model, "new", array)
    expected = numpy_helper.from_array(array, "new")
    assert model.graph.initializer[-1].SerializeToString() == expected.SerializeToString()
    assert returned.SerializeToString() == expected.SerializeToString()
    returned.name = "edited"  # the returned tensor is the graph's own entry
    assert model.graph.initializer[-1].name == "edited"


def test_add_initializer_of_a_tensor_proto_and_a_string_array():
    model = many_weights_model(1)
    source = init("elsewhere", np.arange(4, dtype=np.int64))
    add_initializer(model, "copy", source)
    add_initializer(model, "words", np.array(["a", "bc"]))
    copy, words = model.graph.initializer[-2], model.graph.initializer[-1]
    assert copy.name == "copy" and source.name == "elsewhere"
    assert numpy_helper.to_array(copy).tolist() == [0, 1, 2, 3]
    assert words.data_type == TensorProto.STRING and list(words.string_data) == [b"a", b"bc"]


def test_subgraphs_only_searches_ops_that_can_hold_graphs():
    model = if_model()
    relu, if_node = model.graph.node
    assert subgraphs(relu) == [] and sorted(g.name for g in subgraphs(if_node)) == ["else", "then"]
    body = helper.make_graph([helper.make_node("Neg", ["outer"], ["o"], name="neg")], "body", [], [vi("o", [2])])
    custom = helper.make_node("MyOp", ["x"], ["y"], name="custom", domain="my.domain", body=body)
    assert [g.name for g in subgraphs(custom)] == ["body"] and subgraph_reads(custom) == {"outer"}


def test_without_large_weights_infers_the_same_shapes_as_the_whole_model():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "target"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc")]
    inits = [init("w", rng.standard_normal((16, 3, 3, 3)).astype(np.float32)),  # 432: kept
             init("target", np.array([1, -1], np.int64)),
             init("fc", rng.standard_normal((16 * 8 * 8, 10)).astype(np.float32))]  # 10240: an input
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [vi("y", None)], inits)
    light = without_large_weights(model)
    assert [i.name for i in light.graph.initializer] == ["w", "target"]
    assert [i.name for i in light.graph.input] == ["x", "fc"]
    assert light.graph.input[1].type.tensor_type.shape.dim[0].dim_value == 1024
    full = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    lean = shape_inference.infer_shapes(light, strict_mode=True, data_prop=True)
    assert [v.SerializeToString() for v in full.graph.value_info] == \
        [v.SerializeToString() for v in lean.graph.value_info]
    assert full.graph.output[0].SerializeToString() == lean.graph.output[0].SerializeToString()
    assert [d.dim_value for d in full.graph.output[0].type.tensor_type.shape.dim] == [1, 10]
    assert isinstance(light, onnx.ModelProto) and len(model.graph.initializer) == 3  # the model is untouched
