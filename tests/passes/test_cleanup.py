"""NameNodes, RemoveIdentity, RemoveDeadCode: structure and onnxruntime numbers before/after.

These passes only rewire or delete, never compute, so outputs must be bit-identical
(rtol = atol = 0).
"""
import numpy as np
import pytest
from graphs import assert_same_outputs, check, make_model, node, ops, run, vi
from onnx import TensorProto, helper

from passes.cleanup import NameNodes, RemoveDeadCode, RemoveIdentity
from passes.errors import PassError

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3)).astype(np.float32)


# -- NameNodes ---------------------------------------------------------------------------------


def test_name_nodes_names_unnamed_and_dedups():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),  # takes the name an unnamed node would get
        helper.make_node("Neg", ["b"], ["c"], name="dup"),
        helper.make_node("Neg", ["c"], ["d"], name="dup"),
        helper.make_node("Abs", ["d"], ["y"]),
    ]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = NameNodes()(model)
    names = [n.name for n in result.model.graph.node]
    assert names == ["Relu_1", "Relu_0", "dup", "dup_1", "Abs_0"]
    assert result.modified
    assert result.changes == ["named 2 unnamed nodes", "renamed 1 duplicate node names"]
    assert not NameNodes()(result.model).modified  # idempotent
    # onnxruntime refuses the duplicate names of the input model, so the reference is numpy
    np.testing.assert_array_equal(run(result.model, {"x": X})[0], np.abs(np.maximum(X, 0)))


def test_name_nodes_reaches_subgraphs():
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [vi("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [], [vi("e", [2, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", [2, 3]), vi("cond", [], TensorProto.BOOL)], [("y", [2, 3])])
    out = NameNodes()(model).model
    assert out.graph.node[0].name == "If_0"
    attrs = {a.name: a.g for a in out.graph.node[0].attribute}
    assert attrs["then_branch"].node[0].name == "Neg_0"
    assert attrs["else_branch"].node[0].name == "Abs_0"


# -- RemoveIdentity ----------------------------------------------------------------------------


def test_identity_in_the_middle_is_removed():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Identity", ["a"], ["b"], name="id"),
             helper.make_node("Neg", ["b"], ["y"], name="n")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = RemoveIdentity()(model)
    assert ops(result.model) == ["Relu", "Neg"]
    assert node(result.model, "n").input[0] == "a"
    assert result.changes == ["removed 1 Identity"]
    check(result.model)
    assert_same_outputs(model, result.model, {"x": X}, rtol=0, atol=0)


def test_identity_before_graph_output_rewires_producer():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Neg", ["a"], ["n_out"], name="n"),
             helper.make_node("Identity", ["a"], ["y"], name="id")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3]), ("n_out", [2, 3])])
    result = RemoveIdentity()(model)
    out = result.model
    assert ops(out) == ["Relu", "Neg"]
    assert [o.name for o in out.graph.output] == ["y", "n_out"]  # graph outputs keep their names
    assert list(node(out, "r0").output) == ["y"]
    assert list(node(out, "n").input) == ["y"]
    check(out)
    assert_same_outputs(model, out, {"x": X}, rtol=0, atol=0)


def test_identity_chain_to_graph_output():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Identity", ["a"], ["b"], name="id1"),
             helper.make_node("Identity", ["b"], ["y"], name="id2")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = RemoveIdentity()(model)
    assert ops(result.model) == ["Relu"]
    assert result.changes == ["removed 2 Identity"]
    assert_same_outputs(model, result.model, {"x": X}, rtol=0, atol=0)


def test_identity_between_graph_input_and_output_is_kept():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = RemoveIdentity()(model)
    assert ops(result.model) == ["Identity"]
    assert not result.modified
    assert "kept Identity 'id'" in result.changes[0] and "graph input" in result.changes[0]
    check(result.model)
    assert_same_outputs(model, result.model, {"x": X}, rtol=0, atol=0)


def test_identity_between_two_graph_outputs_is_kept():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Identity", ["a"], ["y"], name="id")]
    model = make_model(nodes, [("x", [2, 3])], [("a", [2, 3]), ("y", [2, 3])])
    result = RemoveIdentity()(model)
    assert ops(result.model) == ["Relu", "Identity"]
    assert "is a graph output" in result.changes[0]
    assert_same_outputs(model, result.model, {"x": X}, rtol=0, atol=0)


def test_identity_of_initializer_feeding_a_node_is_removed():
    nodes = [helper.make_node("Identity", ["w"], ["w2"], name="id"),
             helper.make_node("Add", ["x", "w2"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], [("w", np.ones((2, 3), np.float32))])
    out = RemoveIdentity()(model).model
    assert ops(out) == ["Add"] and list(node(out, "add").input) == ["x", "w"]
    assert_same_outputs(model, out, {"x": X}, rtol=0, atol=0)


def test_identity_read_inside_a_subgraph_is_rewired_there():
    then_g = helper.make_graph([helper.make_node("Neg", ["b"], ["t"], name="neg")], "then", [], [vi("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["b"], ["e"], name="abs")], "else", [], [vi("e", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Identity", ["a"], ["b"], name="id"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", [2, 3]), vi("cond", [], TensorProto.BOOL)], [("y", [2, 3])])
    out = RemoveIdentity()(model).model
    assert ops(out) == ["Relu", "If"]
    check(out)
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": X, "cond": np.array(cond)}, rtol=0, atol=0)


def test_dropout_opset12_with_unused_mask_is_removed():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Dropout", ["a", "ratio"], ["b", "mask"], name="drop"),
             helper.make_node("Neg", ["b"], ["y"], name="n")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], [("ratio", np.array(0.3, np.float32))], opset=13)
    result = RemoveIdentity()(model)
    assert ops(result.model) == ["Relu", "Neg"]
    assert result.changes == ["removed 1 Dropout"]
    assert_same_outputs(model, result.model, {"x": X}, rtol=0, atol=0)


def test_dropout_opset7_attribute_form_is_removed():
    nodes = [helper.make_node("Dropout", ["x"], ["y"], name="drop", ratio=0.5)]
    nodes.insert(0, helper.make_node("Relu", ["x0"], ["x"], name="r0"))
    model = make_model(nodes, [("x0", [2, 3])], [("y", [2, 3])], opset=7)
    out = RemoveIdentity()(model).model
    assert ops(out) == ["Relu"]
    check(out)
    assert_same_outputs(model, out, {"x0": X}, rtol=0, atol=0)


def test_dropout_with_used_mask_is_an_error():
    nodes = [helper.make_node("Dropout", ["x"], ["a", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["m"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["a", "m"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], opset=13)
    with pytest.raises(PassError) as err:
        RemoveIdentity()(model)
    assert "node 'drop' (Dropout)" in str(err.value)
    assert "mask output 'mask' is read" in str(err.value)


def test_dropout_in_training_mode_is_an_error():
    nodes = [helper.make_node("Dropout", ["x", "", "train"], ["y"], name="drop")]
    nodes.insert(0, helper.make_node("Relu", ["x0"], ["x"], name="r0"))
    model = make_model(nodes, [("x0", [2, 3])], [("y", [2, 3])], [("train", np.array(True))], opset=13)
    with pytest.raises(PassError, match="node 'drop' \\(Dropout\\): training_mode is true"):
        RemoveIdentity()(model)


# -- RemoveDeadCode ----------------------------------------------------------------------------


def test_dead_nodes_and_initializers_are_removed():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Add", ["a", "w_dead"], ["dead1"], name="dead_add"),
             helper.make_node("Neg", ["dead1"], ["dead2"], name="dead_neg"),
             helper.make_node("Add", ["a", "w"], ["y"], name="add")]
    inits = [("w", np.ones((2, 3), np.float32)), ("w_dead", np.ones((2, 3), np.float32)),
             ("unused", np.zeros(4, np.float32))]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], inits)
    model.graph.value_info.append(vi("dead2", [2, 3]))
    result = RemoveDeadCode()(model)
    out = result.model
    assert ops(out) == ["Relu", "Add"]
    assert [i.name for i in out.graph.initializer] == ["w"]
    assert len(out.graph.value_info) == 0
    assert result.changes == ["removed 2 dead nodes (1 Add, 1 Neg)", "removed 2 unused initializers",
                              "dropped 1 stale value_info"]
    assert not RemoveDeadCode()(out).modified
    check(out)
    assert_same_outputs(model, out, {"x": X}, rtol=0, atol=0)


def test_unused_initializer_listed_as_graph_input_is_dropped_from_inputs():
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    inits = [("w", np.ones((2, 3), np.float32)), ("old", np.ones(3, np.float32))]
    model = make_model(nodes, [("x", [2, 3]), ("spare", [1])], [("y", [2, 3])], inits, opset=7)
    assert [i.name for i in model.graph.input] == ["x", "spare", "w", "old"]
    out = RemoveDeadCode()(model).model
    # the unused real input 'spare' is interface and stays; the unused weight 'old' goes
    assert [i.name for i in out.graph.input] == ["x", "spare", "w"]
    assert [i.name for i in out.graph.initializer] == ["w"]
    check(out)
    feeds = {"x": X, "spare": np.zeros(1, np.float32)}
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_tensor_read_only_inside_a_subgraph_is_live():
    then_g = helper.make_graph([helper.make_node("Neg", ["a"], ["t"], name="neg")], "then", [], [vi("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Add", ["a", "w"], ["e"], name="addw")], "else", [],
                               [vi("e", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", [2, 3]), vi("cond", [], TensorProto.BOOL)], [("y", [2, 3])],
                       [("w", np.full((2, 3), 2, np.float32))])
    result = RemoveDeadCode()(model)
    assert not result.modified and ops(result.model) == ["Relu", "If"]
    assert [i.name for i in result.model.graph.initializer] == ["w"]
    for cond in (True, False):
        assert_same_outputs(model, result.model, {"x": X, "cond": np.array(cond)}, rtol=0, atol=0)


def test_node_with_one_live_output_stays():
    nodes = [helper.make_node("Split", ["x"], ["s0", "s1", "s2"], name="split", axis=1, num_outputs=3),
             helper.make_node("Neg", ["s1"], ["y"], name="n")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 1])], opset=18)
    out = RemoveDeadCode()(model).model
    assert ops(out) == ["Split", "Neg"]
    assert_same_outputs(model, out, {"x": X}, rtol=0, atol=0)


def test_errors_name_the_pass():
    nodes = [helper.make_node("Dropout", ["x"], ["a", "mask"], name="d"),
             helper.make_node("Not", ["mask"], ["y"], name="n")]
    model = make_model(nodes, [("x", [2, 3])], [vi("y", [2, 3], TensorProto.BOOL)])
    with pytest.raises(PassError, match="pass 'remove_identity'"):
        RemoveIdentity()(model)
