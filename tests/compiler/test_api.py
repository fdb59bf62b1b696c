"""The Python API: ``compile_model`` on a path or a ModelProto, with calibration as a dict or an
.npz path; ``CompileResult.program``, ``.qdq_model`` and ``.save``; the saved program runs like
the in-memory one; refusals are CompileError; the caller's ModelProto is left alone."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import runtime
from compiler.api import CompileResult, compile_model
from compiler.errors import CompileError
from runtime import Program
from tools import model_zoo

SAMPLES = 6


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    model = model_zoo.gemm_head_net()
    model_zoo.save_model(model, d / "model.onnx")
    calib = model_zoo.calibration_samples(model, SAMPLES, seed=0)
    np.savez(d / "calib.npz", **calib)
    feeds = model_zoo.calibration_samples(model, 3, seed=1)
    return {"model": model, "path": d / "model.onnx", "calib": calib, "calib_path": d / "calib.npz", "feeds": feeds}


@pytest.fixture(scope="module")
def result(zoo) -> CompileResult:
    return compile_model(zoo["model"], target="mmav2", calibration=zoo["calib"])


def _serialized(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def test_result_holds_program_and_qdq_model(zoo, result):
    assert isinstance(result.program, Program)
    assert result.program.inputs == ["input"]
    assert result.program.outputs == [o.name for o in zoo["model"].graph.output] == ["logits"]
    assert result.program.metadata["target"] == "mmav2"
    assert isinstance(result.qdq_model, onnx.ModelProto)
    onnx.checker.check_model(result.qdq_model)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in result.qdq_model.graph.node}


def test_save_writes_its_files_and_the_saved_program_runs_the_same(zoo, result, tmp_path):
    out = tmp_path / "nested" / "out"  # created by save
    paths = result.save(out)
    assert set(paths) == {"program", "qdq_model", "report", "offload", "offload_json"}
    assert sorted(p.name for p in out.iterdir()) == ["model.qdq.onnx", "model.qir", "offload.json", "offload.txt",
                                                     "report.txt"]
    assert paths["offload"].read_text() == result.report.offload.text()
    assert all(p.parent == out and p.is_file() for p in paths.values())
    assert _serialized(onnx.load(str(paths["qdq_model"]))) == _serialized(result.qdq_model)
    assert paths["report"].read_text() == result.report.text()

    loaded = runtime.load_program(paths["program"])
    for raw in (False, True):
        want = result.program.run(zoo["feeds"], raw=raw)
        got = loaded.run(zoo["feeds"], raw=raw)
        assert list(got) == list(want) == ["logits"]
        assert got["logits"].dtype == want["logits"].dtype
        assert got["logits"].shape == (3, 10)
        np.testing.assert_array_equal(got["logits"], want["logits"])
    assert loaded.run(zoo["feeds"])["logits"].dtype == np.float32


def test_path_and_npz_give_the_same_program_as_proto_and_dict(zoo, result):
    from_path = compile_model(str(zoo["path"]), target="mmav2", calibration=str(zoo["calib_path"]))
    # the source name differs (file name vs graph name); everything else is the same program
    assert from_path.program.metadata["source"] == "model.onnx"
    assert result.program.metadata["source"] == zoo["model"].graph.name

    def text(program):
        return [line for line in runtime.program_to_text(program).splitlines() if not line.startswith("meta source")]

    assert text(from_path.program) == text(result.program)
    for a, b in zip(from_path.program.layers, result.program.layers, strict=True):
        assert sorted(a.params) == sorted(b.params)
        for key in a.params:
            np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=f"{a.name}.{key}")
    np.testing.assert_array_equal(from_path.program.run(zoo["feeds"], raw=True)["logits"],
                                  result.program.run(zoo["feeds"], raw=True)["logits"])


def test_both_targets(zoo):
    v1 = compile_model(zoo["model"], target="mmav1", calibration=zoo["calib"])
    assert v1.program.metadata["target"] == "mmav1"
    assert v1.target.name == "mmav1"
    out = v1.program.run(zoo["feeds"])["logits"]
    assert out.shape == (3, 10) and np.isfinite(out).all()


def test_compiling_does_not_modify_the_input_model(zoo):
    # a model the loader has to edit (symbolic batch fixed to 1) and the passes rewrite (BN, fusion)
    model = onnx.ModelProto()
    model.CopyFrom(zoo["model"])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    before = _serialized(model)
    res = compile_model(model, target="mmav2", calibration=zoo["calib"], input_shapes={"input": (1, 3, 16, 16)})
    assert _serialized(model) == before
    assert tuple(res.program.tensors["input"].shape) == (1, 3, 16, 16)

    before = _serialized(zoo["model"])
    compile_model(zoo["model"], target="mmav1", calibration=zoo["calib"], dump_dir=None)
    assert _serialized(zoo["model"]) == before


@pytest.mark.parametrize("target", ["mmav3", "", "MMAV2"])
def test_unknown_target(zoo, target):
    with pytest.raises(CompileError, match=r"unknown target .*mmav1.*mmav2"):
        compile_model(zoo["model"], target=target, calibration=zoo["calib"])


def test_missing_calibration(zoo):
    with pytest.raises(CompileError, match="calibration"):
        compile_model(zoo["model"], target="mmav2")
    with pytest.raises(CompileError, match="calibration"):
        compile_model(zoo["model"], target="mmav2", calibration=None)


def test_bad_calibration_is_a_compile_error(zoo, tmp_path):
    with pytest.raises(CompileError, match="'image'"):
        compile_model(zoo["model"], calibration={"image": zoo["calib"]["input"], "x": zoo["calib"]["input"]})
    with pytest.raises(CompileError, match="no such file"):
        compile_model(zoo["model"], calibration=str(tmp_path / "missing.npz"))
    bad = zoo["calib"]["input"].copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(CompileError, match="non-finite"):
        compile_model(zoo["model"], calibration={"input": bad})


def test_unsupported_ops_are_a_compile_error_listing_every_node(zoo):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Hardmax", ["input"], ["a"], name="s1", axis=1),
             helper.make_node("LpNormalization", ["a"], ["y"], name="s2", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(CompileError) as info:
        compile_model(model, calibration={"input": np.ones((2, 4), np.float32)})
    message = str(info.value)
    assert "node 's1' (Hardmax)" in message and "node 's2' (LpNormalization)" in message
