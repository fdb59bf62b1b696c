"""The default pipeline: order, convergence, the round cap, and the numbers end to end.

The pipeline folds BatchNormalization (float32 weights from float64 arithmetic), so the
tolerance is BatchNorm folding's: rtol 1e-5, atol 1e-5 (see test_batchnorm_folding.py).
"""
import numpy as np
import onnx
from graphs import (
    assert_same_outputs,
    bn_inits,
    bn_node,
    check,
    init,
    make_model,
    ops,
    rand,
)
from onnx import helper

from passes.activation_fusion import fused_groups
from passes.base import GraphPass, Instrument, PassManager, PassResult
from passes.pipeline import default_passes, run_default_pipeline


def small_net():
    """Conv-BN-Relu, an Identity, a Shape->Gather->Concat->Reshape flatten, Dropout, Gemm-BN-Clip."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),  # unnamed on purpose
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Identity", ["r1"], ["i1"], name="id"),
        helper.make_node("Shape", ["i1"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["i1", "target"], ["flat"], name="flatten"),
        helper.make_node("Dropout", ["flat"], ["d"], name="drop"),
        helper.make_node("Gemm", ["d", "w2", "b2"], ["g"], name="fc", transB=1),
        bn_node("bn2", "g", "b2n"),
        helper.make_node("Clip", ["b2n", "lo", "hi"], ["y"], name="relu6"),
    ]
    inits = [init("w1", rand(rng, 4, 3, 3, 3)), init("zero", np.array(0, np.int64)),
             init("axes", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64)),
             init("w2", rand(rng, 5, 64, scale=0.2)), init("b2", rand(rng, 5)),
             init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    inits += bn_inits(rng, "bn1", 4) + bn_inits(rng, "bn2", 5)
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", [2, 5])], inits)
    return model, {"x": rand(rng, 2, 3, 4, 4)}


def test_default_passes_order():
    assert [p.name for p in default_passes()] == [
        "name_nodes", "remove_identity", "fold_constants", "simplify_casts", "sum_to_add", "prelu_slope_per_channel",
        "matmul_add_to_gemm", "remove_dead_code", "fold_batchnorm",
        "normalize_gemm", "fold_pad_into_conv", "fuse_elementwise_chains", "fuse_activations"]


def test_pipeline_end_to_end():
    model, feeds = small_net()
    result = run_default_pipeline(model)
    out = result.model
    assert result.converged
    assert ops(out) == ["Conv", "Relu", "Reshape", "Gemm", "Clip"]
    assert {k: v.op_type for k, v in fused_groups(out).items()} == {"Conv_0": "Relu", "fc": "Clip"}
    assert sorted({r.round for r in result.records}) == [1, 2]  # round 2 changes nothing
    assert not any(r.modified for r in result.records if r.round == 2)
    # the folded weights and biases, the Reshape target and the Clip bounds; nothing dead is left
    assert sorted(i.name for i in out.graph.initializer) == [
        "Conv_0_bias_bn", "b2_bn", "hi", "lo", "target", "w1_bn", "w2_bn"]
    check(out)
    assert_same_outputs(model, out, feeds, rtol=1e-5, atol=1e-5)


class AlwaysModifies(GraphPass):
    name = "always"

    def apply(self, model):
        return PassResult(model, True, ["claims a change"])


class Recorder(Instrument):
    def __init__(self):
        self.after, self.finished = [], None

    def after_pass(self, record, model):
        self.after.append(record.name)

    def finish(self, records):
        self.finished = len(records)


def test_round_cap_stops_a_pass_that_always_claims_a_change():
    model, _ = small_net()
    recorder = Recorder()
    result = PassManager([AlwaysModifies()], max_rounds=3, instruments=(recorder,)).run(model)
    assert not result.converged
    assert [r.round for r in result.records] == [1, 2, 3]
    assert recorder.after == ["always"] * 3 and recorder.finished == 3


def test_run_default_pipeline_honours_max_rounds_and_instruments():
    model, _ = small_net()
    recorder = Recorder()
    result = run_default_pipeline(model, instruments=(recorder,), max_rounds=1)
    assert not result.converged  # one round changed the graph, and there was no second to confirm
    n = len(default_passes())
    assert len(result.records) == n and recorder.finished == n
    assert recorder.after == [p.name for p in default_passes()]


class RenamesFirstNode(GraphPass):
    name = "rename_first"

    def apply(self, model):
        model.graph.node[0].name = "renamed"
        return PassResult(model, False, [])


def test_a_pass_copies_its_input_unless_asked_to_work_in_place():
    model, _ = small_net()
    before = model.SerializeToString()
    copied = RenamesFirstNode()(model)
    assert copied.model is not model and copied.model.graph.node[0].name == "renamed"
    assert model.SerializeToString() == before
    edited = RenamesFirstNode()(model, in_place=True)
    assert edited.model is model and model.graph.node[0].name == "renamed"


class SnapshotInstrument(Instrument):
    """Serializes the model it is shown at once, as DumpInstrument writes its file."""

    def __init__(self):
        self.snapshots = []

    def after_pass(self, record, model):
        self.snapshots.append((record.name, model.SerializeToString()))


def test_pipeline_leaves_its_input_alone_and_instruments_see_each_pass_result():
    model, feeds = small_net()
    before = model.SerializeToString()
    snap = SnapshotInstrument()
    result = run_default_pipeline(model, instruments=(snap,))
    assert model.SerializeToString() == before  # one copy up front; the passes edit that copy
    assert result.model is not model
    # Each snapshot is the model right after its pass: BatchNorm present before folding, gone after.
    names = [n for n, _ in snap.snapshots]
    fold = names.index("fold_batchnorm")
    ops_at = [[n.op_type for n in onnx.load_model_from_string(data).graph.node] for _, data in snap.snapshots]
    assert "BatchNormalization" in ops_at[fold - 1] and "BatchNormalization" not in ops_at[fold]
    assert snap.snapshots[-1][1] == result.model.SerializeToString()
    assert_same_outputs(model, result.model, feeds, rtol=1e-5, atol=1e-5)
