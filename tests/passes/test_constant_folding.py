"""FoldConstants: what folds, what never folds, and the numbers before/after.

Folding evaluates with onnx.reference, whose float32 kernels are numpy's; onnxruntime computes
the same elementwise ops in float32 too, so outputs agree to a few ulps: rtol 1e-6, atol 1e-6
(shape arithmetic is integer and exact).
"""
import numpy as np
import pytest
from graphs import assert_same_outputs, check, make_model, node, ops, run, vi
from onnx import TensorProto, helper, numpy_helper

from passes.cleanup import RemoveDeadCode
from passes.constant_folding import NEVER_FOLD, FoldConstants

RNG = np.random.default_rng(1)


def inits_of(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_constant_nodes_become_initializers():
    value = RNG.standard_normal((2, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(value)),
             helper.make_node("Constant", [], ["k"], name="k", value_ints=[2, 3]),
             helper.make_node("Add", ["x", "c"], ["a"], name="add"),
             helper.make_node("Reshape", ["a", "k"], ["y"], name="reshape")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = FoldConstants()(model)
    assert ops(result.model) == ["Add", "Reshape"]
    assert result.changes[0] == "converted 2 Constant nodes to initializers"
    got = inits_of(result.model)
    np.testing.assert_array_equal(got["c"], value)
    np.testing.assert_array_equal(got["k"], [2, 3])
    check(result.model)
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x}, rtol=0, atol=0)


def test_all_constant_subexpression_is_evaluated():
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
             helper.make_node("Mul", ["wt", "two"], ["w2"], name="scale"),
             helper.make_node("MatMul", ["x", "w2"], ["y"], name="mm")]
    model = make_model(nodes, [("x", [2, 4])], [("y", [2, 3])],
                       [("w", w), ("two", np.array(2.0, np.float32))])
    result = FoldConstants()(model)
    assert ops(result.model) == ["MatMul"]
    assert result.changes == ["folded 2 nodes (1 Mul, 1 Transpose)"]
    np.testing.assert_array_equal(inits_of(result.model)["w2"], w.T * 2)
    pruned = RemoveDeadCode()(result.model).model
    assert sorted(inits_of(pruned)) == ["w2"]
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    assert_same_outputs(model, pruned, {"x": x}, rtol=1e-6, atol=1e-6)


def _shape_chain(opset=17, batch=2):
    """x [N, 3, 4, 5] -> Reshape to [N, 60], the target shape computed from Shape(x)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    inits = [("zero", np.array(0, np.int64)), ("axes", np.array([0], np.int64)),
             ("minus1", np.array([-1], np.int64))]
    return make_model(nodes, [("x", [batch, 3, 4, 5])], [("y", [batch, 60])], inits, opset=opset)


def test_shape_gather_concat_reshape_chain_collapses():
    model = _shape_chain()
    result = FoldConstants()(model)
    assert result.changes == ["folded 4 nodes (1 Concat, 1 Gather, 1 Shape, 1 Unsqueeze)"]
    out = RemoveDeadCode()(result.model).model
    assert ops(out) == ["Reshape"]
    np.testing.assert_array_equal(inits_of(out)["target"], [2, -1])
    check(out)
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=0, atol=0)


def test_shape_of_dynamic_tensor_is_not_folded():
    model = _shape_chain(batch="N")
    result = FoldConstants()(model)
    assert not result.modified
    assert ops(result.model) == ops(model)


def test_shape_start_end_and_size():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=-1),
             helper.make_node("Size", ["x"], ["n"], name="size"),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["s", "n1"], ["sn"], name="concat", axis=0),
             helper.make_node("Cast", ["sn"], ["y"], name="cast", to=TensorProto.FLOAT)]
    model = make_model(nodes, [("x", [2, 3, 4, 5])], [("y", [3]), ("r", [2, 3, 4, 5])],
                       [("axes", np.array([0], np.int64))], opset=15)
    result = FoldConstants()(model)
    # the graph output 'y' folds into a Constant node (named after the Cast), not an initializer
    assert ops(result.model) == ["Relu", "Constant"]
    np.testing.assert_array_equal(numpy_helper.to_array(node(result.model, "cast").attribute[0].t),
                                  [3, 4, 120])
    check(result.model)
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x}, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["QuantizeLinear", "DequantizeLinear"])
def test_qdq_is_never_folded(op):
    if op == "DequantizeLinear":
        q = np.array([[-3, 5, 127], [0, -128, 7]], np.int8)
        nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"], name="dq"),
                 helper.make_node("Add", ["x", "w"], ["y"], name="add")]
        inits = [("wq", q), ("s", np.array(0.05, np.float32)), ("zp", np.array(0, np.int8))]
    else:
        nodes = [helper.make_node("QuantizeLinear", ["wf", "s", "zp"], ["wq"], name="q"),
                 helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"], name="dq"),
                 helper.make_node("Add", ["x", "w"], ["y"], name="add")]
        inits = [("wf", RNG.standard_normal((2, 3)).astype(np.float32)),
                 ("s", np.array(0.05, np.float32)), ("zp", np.array(0, np.int8))]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], inits, opset=13)
    result = FoldConstants()(model)
    assert not result.modified
    assert ops(result.model) == ops(model)
    assert {"QuantizeLinear", "DequantizeLinear"} <= NEVER_FOLD
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x}, rtol=0, atol=0)


def test_ops_after_a_dequantize_stay_unfolded():
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="dq"),
             helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    inits = [("wq", np.arange(12, dtype=np.int8).reshape(3, 4)), ("s", np.array(0.1, np.float32))]
    model = make_model(nodes, [("x", [2, 4])], [("y", [2, 3])], inits, opset=13)
    assert ops(FoldConstants()(model).model) == ["DequantizeLinear", "Transpose", "MatMul"]


def test_random_ops_are_never_folded():
    nodes = [helper.make_node("RandomNormalLike", ["shape_src"], ["noise"], name="rnd", seed=1.0),
             helper.make_node("Mul", ["noise", "zero"], ["z"], name="mul"),
             helper.make_node("Add", ["x", "z"], ["y"], name="add")]
    inits = [("shape_src", np.zeros((2, 3), np.float32)), ("zero", np.zeros((), np.float32))]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], inits)
    result = FoldConstants()(model)
    assert ops(result.model) == ["RandomNormalLike", "Mul", "Add"]
    assert not result.modified


def test_failed_evaluation_is_reported_not_hidden():
    nodes = [helper.make_node("Reshape", ["c", "bad_shape"], ["r"], name="bad_reshape"),
             helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    inits = [("c", np.zeros(6, np.float32)), ("bad_shape", np.array([4, 4], np.int64))]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], inits)
    result = FoldConstants()(model)
    assert not result.modified
    assert ops(result.model) == ["Reshape", "Add"]
    failure = [c for c in result.changes if c.startswith("could not fold")]
    assert failure and failure[0].startswith("could not fold Reshape 'bad_reshape': ")


def test_growth_limit_leaves_large_expansions():
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos",
                              value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    model = make_model(nodes, [("x", [64, 64])], [("y", [64, 64])], [("shape", np.array([64, 64], np.int64))])
    small = FoldConstants(max_growth_elements=1000)(model)
    assert ops(small.model) == ["ConstantOfShape", "Add"]
    assert any("not folded ConstantOfShape 'cos': would add 4096 elements" in c for c in small.changes)
    folded = FoldConstants()(model)
    assert ops(folded.model) == ["Add"]
    x = RNG.standard_normal((64, 64)).astype(np.float32)
    assert_same_outputs(model, folded.model, {"x": x}, rtol=0, atol=0)


def test_old_ir_folded_initializers_are_listed_as_inputs():
    nodes = [helper.make_node("Constant", [], ["c"], name="const",
                              value=numpy_helper.from_array(np.full((2, 3), 0.5, np.float32))),
             helper.make_node("Mul", ["c", "c"], ["c2"], name="sq"),
             helper.make_node("Add", ["x", "c2"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])], opset=7)
    assert model.ir_version == 3
    out = RemoveDeadCode()(FoldConstants()(model).model).model
    assert ops(out) == ["Add"]
    assert [i.name for i in out.graph.input] == ["x", "c2"]
    check(out)  # IR 3: every initializer must also be a graph input
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=0, atol=0)


def test_constant_feeding_a_graph_output_stays_a_constant_node():
    nodes = [helper.make_node("Constant", [], ["y"], name="const", value_floats=[1.0, 2.0]),
             helper.make_node("Relu", ["x"], ["r"], name="relu")]
    model = make_model(nodes, [("x", [2])], [("y", [2]), ("r", [2])])
    result = FoldConstants()(model)
    assert not result.modified and ops(result.model) == ["Constant", "Relu"]
    np.testing.assert_array_equal(run(result.model, {"x": np.ones(2, np.float32)})[0], [1.0, 2.0])


def test_old_opset_semantics_are_used_for_evaluation():
    # Squeeze takes its axes as an attribute before opset 13: evaluation must follow the model's opset
    nodes = [helper.make_node("Squeeze", ["c"], ["c1"], name="sq", axes=[0]),
             helper.make_node("Add", ["x", "c1"], ["y"], name="add")]
    model = make_model(nodes, [("x", [3])], [("y", [3])], [("c", np.ones((1, 3), np.float32))], opset=11)
    out = FoldConstants()(model).model
    assert ops(out) == ["Add"]
    assert inits_of(out)["c1"].shape == (3,)
    x = RNG.standard_normal(3).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=0, atol=0)


def test_folding_is_idempotent():
    out = FoldConstants()(_shape_chain()).model
    again = FoldConstants()(out)
    assert not again.modified


def test_declared_int64_type_is_kept():
    model = _shape_chain()
    model.graph.value_info.append(vi("s", [4], TensorProto.INT64))
    out = FoldConstants()(model).model
    assert inits_of(out)["s"].dtype == np.int64
