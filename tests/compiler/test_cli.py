"""The ``qlower`` command line, run in-process through ``compiler.cli.main`` (two tests run it as
``python -m compiler.cli`` to see the real exit code and stderr): compile, run, inspect, and the
contract for bad input -- exit status 2, one ``qlower: error:`` line on stderr, no traceback, and
nothing written to ``--out``."""
from __future__ import annotations

import builtins
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main
from runtime import load_program
from tools import model_zoo

ROOT = Path(__file__).resolve().parents[2]
CALIB_SAMPLES = 8
RUN_SAMPLES = 5  # not a multiple of the batch size used below, so the last batch is short


# ------------------------------------------------------------------------------------ helpers


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured (for module-scoped fixtures, where capsys is
    not available)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _assert_user_error(rc: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, exactly one 'qlower: error:' line on stderr naming ``expected``, no traceback."""
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qlower: error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _assert_nothing_written(out_dir: Path) -> None:
    """--out is absent or empty: no partial, hidden or temporary files."""
    if out_dir.exists():
        assert out_dir.is_dir()
        assert sorted(p.name for p in out_dir.iterdir()) == []


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _with_input_dim_param(model: onnx.ModelProto, axis: int, name: str) -> onnx.ModelProto:
    m = _copy(model)
    m.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    del m.graph.value_info[:]  # the stored shapes were inferred for the static input
    return m


def _two_input_model() -> onnx.ModelProto:
    """a -> Conv -> (+ b) -> Relu -> y, inputs a and b of shape 1x4x8x8."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "conv.weight")
    nodes = [
        helper.make_node("Conv", ["a", "conv.weight"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["c", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("a", "b")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    graph = helper.make_graph(nodes, "two_inputs", inputs, [output], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _unsupported_ops_model() -> onnx.ModelProto:
    """input[1,4] -> Hardmax -> Relu -> LpNormalization -> Shrink: three nodes with neither an integer
    lowering nor a float implementation."""
    nodes = [
        helper.make_node("Hardmax", ["input"], ["a"], name="my_hardmax", axis=1),
        helper.make_node("Relu", ["a"], ["b"], name="my_relu"),
        helper.make_node("LpNormalization", ["b"], ["c"], name="my_lpnorm", axis=1),
        helper.make_node("Shrink", ["c"], ["y"], name="my_shrink"),
    ]
    graph = helper.make_graph(nodes, "unsupported", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """gemm_head_net (16x16 input, the fastest zoo model) saved with calibration/eval data."""
    d = tmp_path_factory.mktemp("zoo")
    model = model_zoo.gemm_head_net()
    model_zoo.save_model(model, d / "model.onnx")
    calib = model_zoo.calibration_samples(model, CALIB_SAMPLES, seed=0)
    np.savez(d / "calib.npz", **calib)
    evaluation = model_zoo.calibration_samples(model, RUN_SAMPLES, seed=1)
    np.savez(d / "eval.npz", **evaluation)
    return {"dir": d, "model": model, "path": d / "model.onnx", "calib": d / "calib.npz", "calib_data": calib,
            "eval": d / "eval.npz", "eval_data": evaluation}


@pytest.fixture(scope="module")
def compiled(zoo, tmp_path_factory):
    """One CLI compile with --dump-dir and --eval, shared by the tests that read its outputs."""
    d = tmp_path_factory.mktemp("compiled")
    out, dump = d / "out", d / "dump"
    rc, stdout, stderr = _cli(["compile", str(zoo["path"]), "--target", "mmav2", "--calib", str(zoo["calib"]),
                               "--out", str(out), "--dump-dir", str(dump), "--eval", str(zoo["eval"])])
    assert rc == 0, stderr
    return {"out": out, "dump": dump, "stdout": stdout, "stderr": stderr, "qir": out / "model.qir"}


# ------------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("target", ["mmav2", "mmav1"])
def test_compile_writes_program_qdq_model_and_report(zoo, tmp_path, capsys, target):
    out = tmp_path / "out"
    rc = main(["compile", str(zoo["path"]), "--target", target, "--calib", str(zoo["calib"]), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    assert sorted(p.name for p in out.iterdir()) == ["model.qdq.onnx", "model.qir", "offload.json", "offload.txt", "report.txt"]
    assert f"for {target}" in captured.out and "wrote" in captured.out

    program = load_program(out / "model.qir")
    assert program.metadata["target"] == target
    assert program.inputs == ["input"] and program.outputs == ["logits"]
    qdq = onnx.load(str(out / "model.qdq.onnx"))
    onnx.checker.check_model(qdq)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qdq.graph.node}
    report = (out / "report.txt").read_text()
    assert report.startswith("qlower compile report: model.onnx")
    assert f"target: {target}" in report
    for layer in program.layers:
        assert layer.name in report


def test_compile_dump_dir_holds_every_pass_and_a_summary(zoo, compiled):
    dump = compiled["dump"]
    files = sorted(p.name for p in dump.iterdir() if p.suffix == ".onnx")
    assert sorted(p.name for p in dump.iterdir()) == files + ["summary.txt"]
    assert files, "no pass dumps written"
    for i, name in enumerate(files, start=1):
        assert re.fullmatch(rf"{i:02d}_[A-Za-z0-9_.-]+\.onnx", name), name
    assert files[-1].endswith("_insert_qdq.onnx")

    summary = (dump / "summary.txt").read_text().splitlines()
    header, lines = summary[0], summary[1:]
    assert header.startswith("# qlower pass dump:") and f"{len(files)} pass runs" in header
    assert len(lines) == len(files)
    for name, line in zip(files, lines):
        index, pass_name = name[:-len(".onnx")].split("_", 1)
        m = re.match(rf"{index} (\S+)\s+round \d+ nodes\s+(\d+) -> (\d+)\s+([0-9.]+) ms", line)
        assert m, line
        assert m.group(1) == pass_name
        model = onnx.load(str(dump / name))  # every dump loads as an ONNX model
        assert len(model.graph.node) == int(m.group(3)), (name, line)
    counts = [tuple(int(n) for n in re.search(r"nodes\s+(\d+) -> (\d+)", line).groups()) for line in lines]
    assert counts[0][0] == len(zoo["model"].graph.node)  # the first pass sees the loaded model
    for (_, after), (before, _) in itertools.pairwise(counts):
        assert before == after  # each pass starts from the previous pass's model
    # the passes that do something on this model are all listed
    for pass_name in ("fold_batchnorm", "fuse_activations", "insert_qdq"):
        assert any(f" {pass_name} " in line for line in lines), pass_name


def test_compile_eval_prints_sqnr(compiled):
    stdout = compiled["stdout"]
    assert compiled["stderr"] == ""
    sqnr = re.findall(r"^\s+(integer program \(qlower runtime\)|QDQ model \(onnxruntime\)):\s+([-0-9.]+) dB", stdout, re.MULTILINE)
    assert len(sqnr) == 2, stdout
    assert f"accuracy on {RUN_SAMPLES} evaluation samples" in stdout
    for _, value in sqnr:
        assert float(value) > 10.0, stdout  # measured ~28 dB; a broken compile lands far below


def test_compile_input_shape_fixes_a_symbolic_batch(zoo, tmp_path, capsys):
    path = tmp_path / "dynamic_batch.onnx"
    model_zoo.save_model(_with_input_dim_param(zoo["model"], 0, "N"), path)
    out = tmp_path / "out"
    rc = main(["compile", str(path), "--calib", str(zoo["calib"]), "--out", str(out),
               "--input-shape", "input:1x3x16x16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "input 'input' dim 0 'N' fixed to 1" in captured.out
    program = load_program(out / "model.qir")
    assert list(program.tensors["input"].shape) == [1, 3, 16, 16]


def test_compile_batch_size_fixes_a_symbolic_batch(zoo, tmp_path, capsys):
    path = tmp_path / "dynamic_batch.onnx"
    model_zoo.save_model(_with_input_dim_param(zoo["model"], 0, "N"), path)
    out = tmp_path / "out"
    rc = main(["compile", str(path), "--calib", str(zoo["calib"]), "--out", str(out), "--batch-size", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert list(load_program(out / "model.qir").tensors["input"].shape) == [1, 3, 16, 16]


def test_compile_symbolic_non_batch_dim_needs_input_shape(zoo, tmp_path, capsys):
    path = tmp_path / "dynamic_height.onnx"
    model_zoo.save_model(_with_input_dim_param(zoo["model"], 2, "H"), path)
    out = tmp_path / "out"
    rc = main(["compile", str(path), "--calib", str(zoo["calib"]), "--out", str(out)])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "'input'", "'H'", "--input-shape input:")
    _assert_nothing_written(out)

    rc = main(["compile", str(path), "--calib", str(zoo["calib"]), "--out", str(out),
               "--input-shape", "input:1x3x16x16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert list(load_program(out / "model.qir").tensors["input"].shape) == [1, 3, 16, 16]


def test_compile_input_shape_for_an_unknown_input(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compile", str(zoo["path"]), "--calib", str(zoo["calib"]), "--out", str(out),
               "--input-shape", "image:1x3x16x16"])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "'image'", "'input'")
    _assert_nothing_written(out)


def test_compile_bad_eval_data_writes_nothing(zoo, tmp_path, capsys):
    bad = tmp_path / "bad_eval.npz"
    np.savez(bad, input=np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "out"
    rc = main(["compile", str(zoo["path"]), "--calib", str(zoo["calib"]), "--out", str(out), "--eval", str(bad)])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "bad_eval.npz", "(3, 16, 16)", "(3, 8, 8)")
    _assert_nothing_written(out)


def test_compile_out_that_is_a_file(zoo, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    rc = main(["compile", str(zoo["path"]), "--calib", str(zoo["calib"]), "--out", str(out)])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "--out", "not a directory")
    assert out.read_text() == "not a folder"


# ---------------------------------------------------------------------------------------- run


def _feeds(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) for k, v in data.items()}


@pytest.mark.parametrize(("raw", "low_memory", "jobs"), [(False, False, 1), (True, False, 1), (True, True, 1), (True, False, 2)],
                         ids=["float", "raw", "raw-low-memory", "raw-two-processes"])
def test_run_stacks_every_sample_like_the_runtime(zoo, compiled, tmp_path, capsys, raw, low_memory, jobs):
    out = tmp_path / "y.npz"
    argv = ["run", str(compiled["qir"]), "--input", str(zoo["eval"]), "--output", str(out), "--batch-size", "2",
            "--jobs", str(jobs)]
    rc = main(argv + (["--raw"] if raw else []) + (["--low-memory"] if low_memory else []))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"ran {RUN_SAMPLES} samples" in captured.out

    program = load_program(compiled["qir"])
    expected = program.run(_feeds(zoo["eval_data"]), raw=raw)
    onnx_outputs = [o.name for o in zoo["model"].graph.output]
    with np.load(out) as y:
        assert sorted(y.files) == sorted(onnx_outputs) == sorted(expected)
        for name in onnx_outputs:
            got = y[name]
            assert got.shape == (RUN_SAMPLES, 10)
            want_dtype = np.dtype(program.tensors[name].dtype) if raw else np.dtype(np.float32)
            assert got.dtype == want_dtype
            if raw:
                assert got.dtype.kind in "iu"
            np.testing.assert_array_equal(got, expected[name])
    # nothing but the output is left in its folder (no temporary file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.npz"]


def test_run_profile_lists_every_layer_after_the_first_batch(zoo, compiled, tmp_path, capsys):
    out = tmp_path / "y.npz"
    argv = ["run", str(compiled["qir"]), "--input", str(zoo["eval"]), "--output", str(out), "--batch-size", "2"]
    rc = main(argv + ["--profile", "--profile-top", "0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    # 5 samples in batches of 2, 2 and 1: the profile covers the last two batches (3 samples)
    assert lines[1].startswith("profile: 3 samples in 2 batch(es) (after the first")
    program = load_program(compiled["qir"])
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "kind"])
    assert sorted(line.split()[0] for line in lines[header + 1:]) == sorted(layer.name for layer in program.layers)
    with np.load(out) as y:  # the outputs are written as without --profile
        expected = program.run(_feeds(zoo["eval_data"]))
        for name, value in expected.items():
            np.testing.assert_array_equal(y[name], value)


def test_run_profile_rejects_a_negative_count(zoo, compiled, tmp_path, capsys):
    out = tmp_path / "y.npz"
    rc = main(["run", str(compiled["qir"]), "--input", str(zoo["eval"]), "--output", str(out), "--profile",
               "--profile-top=-1"])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "--profile-top -1")
    assert not out.exists()


def test_run_takes_any_single_key_for_a_one_input_model(zoo, compiled, tmp_path, capsys):
    x = tmp_path / "x.npz"
    np.savez(x, whatever=zoo["eval_data"]["input"])
    out = tmp_path / "y.npz"
    rc = main(["run", str(compiled["qir"]), "--input", str(x), "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = load_program(compiled["qir"]).run(_feeds(zoo["eval_data"]))
    with np.load(out) as y:
        np.testing.assert_array_equal(y["logits"], expected["logits"])


@pytest.fixture(scope="module")
def two_input_qir(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_inputs")
    model = _two_input_model()
    model_zoo.save_model(model, d / "model.onnx")
    rng = np.random.default_rng(4)
    data = {n: rng.normal(size=(6, 4, 8, 8)).astype(np.float32) for n in ("a", "b")}
    np.savez(d / "calib.npz", **data)
    rc, _, err = _cli(["compile", str(d / "model.onnx"), "--calib", str(d / "calib.npz"), "--out", str(d / "out")])
    assert rc == 0, err
    return d / "out" / "model.qir", data


def test_run_two_inputs_in_file_order_independent_of_keys(two_input_qir, tmp_path, capsys):
    qir, data = two_input_qir
    x = tmp_path / "x.npz"
    np.savez(x, b=data["b"], a=data["a"])  # keys in the other order
    out = tmp_path / "y.npz"
    rc = main(["run", str(qir), "--input", str(x), "--output", str(out), "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    expected = load_program(qir).run(_feeds(data))
    with np.load(out) as y:
        assert y.files == ["y"]
        assert y["y"].shape == (6, 4, 8, 8)
        np.testing.assert_array_equal(y["y"], expected["y"])


def test_run_missing_input_name(two_input_qir, tmp_path, capsys):
    qir, data = two_input_qir
    x = tmp_path / "x.npz"
    np.savez(x, a=data["a"], c=data["b"])
    out = tmp_path / "y.npz"
    rc = main(["run", str(qir), "--input", str(x), "--output", str(out)])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "'b'")
    assert not out.exists()


@pytest.mark.parametrize("case", ["no_samples", "no_output_folder", "wrong_sample_shape", "not_npz", "not_qir",
                                  "zero_jobs", "zero_batch", "profile_with_jobs", "wrong_shape_in_a_worker"])
def test_run_bad_input(zoo, compiled, tmp_path, capsys, case):
    x = tmp_path / "x.npz"
    out = tmp_path / "y.npz"
    qir = compiled["qir"]
    expected = []
    options = {"zero_jobs": ["--jobs", "0"], "zero_batch": ["--batch-size", "0"],
               "profile_with_jobs": ["--profile", "--jobs", "2"],
               "wrong_shape_in_a_worker": ["--jobs", "2", "--batch-size", "2"]}.get(case, [])
    if case in ("zero_jobs", "zero_batch", "profile_with_jobs"):
        np.savez(x, input=zoo["eval_data"]["input"])
        expected = {"zero_jobs": ["--jobs 0"], "zero_batch": ["--batch-size 0"],
                    "profile_with_jobs": ["--profile", "--jobs"]}[case]
    elif case == "wrong_shape_in_a_worker":
        np.savez(x, input=np.zeros((4, 3, 8, 8), np.float32))
        expected = ["'input'", "[2, 3, 8, 8]"]
    if case == "no_samples":
        np.savez(x, input=np.zeros((0, 3, 16, 16), np.float32))
        expected = ["no samples"]
    elif case == "no_output_folder":
        np.savez(x, input=zoo["eval_data"]["input"])
        out = tmp_path / "missing" / "y.npz"
        expected = ["missing"]
    elif case == "wrong_sample_shape":
        np.savez(x, input=np.zeros((2, 3, 8, 8), np.float32))
        expected = ["'input'", "[2, 3, 8, 8]"]
    elif case == "not_npz":
        x.write_bytes(b"not an npz")
        expected = ["x.npz"]
    elif case == "not_qir":
        np.savez(x, input=zoo["eval_data"]["input"])
        qir = zoo["path"]
        expected = ["model.onnx", "not a .qir file"]
    rc = main(["run", str(qir), "--input", str(x), "--output", str(out), *options])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, *expected)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]


# ------------------------------------------------------------------------------------ inspect


def test_inspect_program_prints_its_layers(compiled, capsys):
    assert main(["inspect", str(compiled["qir"])]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("qlower-ir version")
    program = load_program(compiled["qir"])
    assert len(program.layers) > 0
    for layer in program.layers:
        assert f"layer {layer.name}: {layer.op}" in captured.out


def test_inspect_onnx_shows_qlower_annotations(compiled, capsys):
    dumped = next(p for p in sorted(compiled["dump"].iterdir()) if p.name.endswith("_fuse_activations.onnx"))
    assert main(["inspect", str(dumped)]) == 0
    captured = capsys.readouterr()
    model = onnx.load(str(dumped))
    assert f"{len(model.graph.node)} nodes" in captured.out
    for node in model.graph.node:
        assert f"{node.name} ({node.op_type})" in captured.out
    assert "[qlower.fused_activation=stem.relu]" in captured.out
    assert "[qlower.fused_into=stem.conv]" in captured.out
    assert "[qlower.folded_batchnorm=stem.bn]" in captured.out


def test_inspect_source_onnx_model(zoo, capsys):
    assert main(["inspect", str(zoo["path"])]) == 0
    out = capsys.readouterr().out
    assert "stem.conv (Conv): input, stem.conv.weight -> stem.conv" in out
    assert "qlower." not in out  # the source model carries no annotations


@pytest.mark.parametrize("case", ["missing", "not_a_model", "npz", "bad_qir", "folder"])
def test_inspect_bad_file(zoo, tmp_path, capsys, case):
    path = {"missing": tmp_path / "nope.onnx", "not_a_model": tmp_path / "junk.onnx", "npz": zoo["calib"],
            "bad_qir": tmp_path / "junk.qir", "folder": tmp_path}[case]
    if case in ("not_a_model", "bad_qir"):
        path.write_bytes(b"\x00\xffnot a model at all\x13\x37")
    rc = main(["inspect", str(path)])
    captured = capsys.readouterr()
    what = {"missing": "does not exist", "not_a_model": "neither a .qir program nor an ONNX model",
            "npz": "neither a .qir program nor an ONNX model", "bad_qir": "not a .qir file", "folder": "not a file"}
    _assert_user_error(rc, captured.out, captured.err, str(path), what[case])


# ---------------------------------------------------------------------------- compile refusals


def _bad_compile_case(case: str, zoo, d: Path) -> tuple[Path, Path, list[str]]:
    """(model path, calibration path, texts the error line must contain) for one bad input."""
    model, calib = zoo["path"], zoo["calib"]
    good = zoo["calib_data"]["input"]
    if case == "not_onnx":
        model = d / "garbage.onnx"
        model.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
        return model, calib, ["garbage.onnx", "not an ONNX model"]
    if case == "unsupported_ops":
        model = d / "unsupported.onnx"
        model_zoo.save_model(_unsupported_ops_model(), model)
        calib = d / "calib4.npz"
        np.savez(calib, input=np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
        return model, calib, ["3 node(s)", "'my_hardmax' (Hardmax)", "'my_lpnorm' (LpNormalization)",
                              "'my_shrink' (Shrink)"]
    if case == "dynamic_shape":
        model = d / "dynamic.onnx"
        model_zoo.save_model(_with_input_dim_param(zoo["model"], 3, "W"), model)
        return model, calib, ["'input'", "--input-shape"]
    if case == "calib_key_names":
        calib = d / "keys.npz"
        np.savez(calib, image=good, extra=good)
        return model, calib, ["keys.npz", "'input'", "'image'", "'extra'"]
    if case == "calib_sample_shape":
        calib = d / "shape.npz"
        np.savez(calib, input=good[:, :, :8, :8])
        return model, calib, ["shape.npz", "'input'", "(3, 16, 16)", "(3, 8, 8)"]
    if case == "calib_nan":
        calib = d / "nan.npz"
        bad = good.copy()
        bad[3, 1, 2, 2] = np.nan
        np.savez(calib, input=bad)
        return model, calib, ["nan.npz", "'input'", "1 NaN", "sample(s): 3"]
    if case == "nan_weight":
        m = _copy(zoo["model"])
        init = next(i for i in m.graph.initializer if i.name == "branch_a.conv.weight")
        w = numpy_helper.to_array(init).copy()
        w[0, 0, 1, 1] = np.nan
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        model = d / "nan_weight.onnx"
        model_zoo.save_model(m, model)
        return model, calib, ["nan_weight.onnx", "'branch_a.conv.weight'", "1 NaN", "finite"]
    raise AssertionError(case)


BAD_COMPILE_CASES = ["not_onnx", "unsupported_ops", "dynamic_shape", "calib_key_names", "calib_sample_shape",
                     "calib_nan", "nan_weight"]


@pytest.mark.parametrize("out_exists", [False, True], ids=["new_out", "empty_out"])
@pytest.mark.parametrize("case", BAD_COMPILE_CASES)
def test_compile_refuses_bad_input(zoo, tmp_path, capsys, case, out_exists):
    model, calib, expected = _bad_compile_case(case, zoo, tmp_path)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    rc = main(["compile", str(model), "--calib", str(calib), "--out", str(out)])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, *expected)
    _assert_nothing_written(out)


def _external_weight_model(zoo, d: Path, location: str) -> tuple[Path, bytes]:
    """The zoo model in d/model/, with stem.conv.weight's data at ``location`` (not written);
    returns the model path and the weight's bytes."""
    m = _copy(zoo["model"])
    init = next(i for i in m.graph.initializer if i.name == "stem.conv.weight")
    data = numpy_helper.to_array(init).astype("<f4").tobytes()
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    folder = d / "model"
    folder.mkdir(exist_ok=True)
    model_zoo.save_model(m, folder / "model.onnx")
    return folder / "model.onnx", data


def _spy_on_opened_files(monkeypatch) -> list[str]:
    """Real paths of every file opened through open(), os.open() or onnx's C++ external-data
    opener (what onnx.external_data_helper reads tensors with), until monkeypatch is undone.
    test_external_data_inside_the_model_folder_is_read shows the spy sees external data reads."""
    from onnx import external_data_helper

    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open
    c_checker = getattr(external_data_helper, "c_checker", None)
    if c_checker is not None and hasattr(c_checker, "_open_external_data"):
        real_c_open = c_checker._open_external_data

        def spying_c_open(base_dir, location, *args, **kwargs):
            opened.append(os.path.realpath(os.path.join(base_dir, location)))
            return real_c_open(base_dir, location, *args, **kwargs)

        monkeypatch.setattr(c_checker, "_open_external_data", spying_c_open)

    def spying_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    def spying_os_open(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    monkeypatch.setattr(os, "open", spying_os_open)
    return opened


def test_external_data_inside_the_model_folder_is_read(zoo, tmp_path, capsys, monkeypatch):
    """Control for the test below: the spy does see external data being read."""
    model, data = _external_weight_model(zoo, tmp_path, "weights.bin")
    (model.parent / "weights.bin").write_bytes(data)
    opened = _spy_on_opened_files(monkeypatch)
    out = tmp_path / "out"
    rc = main(["compile", str(model), "--calib", str(zoo["calib"]), "--out", str(out)])
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "read external data of 1 tensor(s) from 'weights.bin'" in captured.out
    assert os.path.realpath(model.parent / "weights.bin") in opened
    assert (out / "model.qir").is_file()


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_compile_refuses_external_data_outside_the_model_folder(zoo, tmp_path, capsys, monkeypatch, where):
    secret = tmp_path / "secret.bin"
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[where]
    model, data = _external_weight_model(zoo, tmp_path, location)
    secret.write_bytes(data)
    if where == "symlink":
        os.symlink(secret, model.parent / "weights.bin")

    def no_loading(*args, **kwargs):
        raise AssertionError("external data was loaded")

    from onnx import external_data_helper

    opened = _spy_on_opened_files(monkeypatch)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", no_loading)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor", no_loading)
    out = tmp_path / "out"
    rc = main(["compile", str(model), "--calib", str(zoo["calib"]), "--out", str(out)])
    monkeypatch.undo()
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "'stem.conv.weight'", f"'{location}'")
    assert "outside the model's folder" in captured.err or "absolute path" in captured.err
    assert os.path.realpath(secret) not in opened
    _assert_nothing_written(out)


# --------------------------------------------------------------------------- real processes


def _python_m(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_process_exit_code_and_no_traceback_for_a_non_onnx_file(zoo, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x96\x01this is not a model" * 10)
    out = tmp_path / "out"
    proc = _python_m(["compile", str(junk), "--calib", str(zoo["calib"]), "--out", str(out)])
    _assert_user_error(proc.returncode, proc.stdout, proc.stderr, "junk.onnx")
    _assert_nothing_written(out)


def test_process_lists_every_unsupported_node_on_one_line(zoo, tmp_path):
    model, calib, expected = _bad_compile_case("unsupported_ops", zoo, tmp_path)
    out = tmp_path / "out"
    proc = _python_m(["compile", str(model), "--calib", str(calib), "--out", str(out)])
    _assert_user_error(proc.returncode, proc.stdout, proc.stderr, *expected)
    _assert_nothing_written(out)


# ------------------------------------------------------------------- file-system errors (OSError)


def test_compile_out_below_a_file(zoo, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["compile", str(zoo["path"]), "--calib", str(zoo["calib"]), "--out", str(blocker / "out")])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_run_output_that_is_a_folder(zoo, compiled, tmp_path, capsys):
    x = tmp_path / "x.npz"
    np.savez(x, input=zoo["eval_data"]["input"])
    taken = tmp_path / "y.npz"
    taken.mkdir()
    rc = main(["run", str(compiled["qir"]), "--input", str(x), "--output", str(taken)])
    captured = capsys.readouterr()
    _assert_user_error(rc, captured.out, captured.err, "y.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "y.npz"]  # no temporary file left
    assert list(taken.iterdir()) == []
