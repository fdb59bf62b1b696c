"""The graph.py helpers the passes build on: subgraph reads, rewiring, shape info, removal."""
import numpy as np
from graphs import init, make_model, vi
from onnx import TensorProto, helper

from passes.graph import (
    GraphIndex,
    add_initializer,
    del_meta,
    drop_unused_initializers,
    get_meta,
    infer_tensor_info,
    remove_nodes,
    rename_output,
    replace_input_uses,
    set_meta,
    subgraph_reads,
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
