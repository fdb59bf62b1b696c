"""The program level: the executor (ports, batch, trace, liveness, errors), the .qir file
format (round trip, byte-identical saves, bad files) and the golden text form."""
import os
import zipfile

import numpy as np
import pytest
from runtime_test_helpers import fork_program, info, layer, single_layer_program

import runtime
from runtime import serialize
from runtime.errors import ProgramError
from runtime.executor import execute, last_uses, run_layer
from runtime.fixed_point import dequantize, quantize
from runtime.ir import Layer, Program


def feed(batch=1, seed=1):
    return {"x": np.random.default_rng(seed).uniform(-2, 2, (batch, 2, 6, 6)).astype(np.float32)}


# --- executor -----------------------------------------------------------------------------------

def test_float_outputs_are_dequantized_raw_outputs():
    p = fork_program()
    raw = execute(p, feed(), raw_outputs=True)["out"]
    assert raw.dtype == np.int8
    out = execute(p, feed())["out"]
    assert out.dtype == np.float32
    assert np.array_equal(out, dequantize(raw, p.tensors["out"].scale, p.tensors["out"].zero_point))
    assert np.array_equal(p.run(feed(), raw=True)["out"], raw)
    assert np.array_equal(p.run(feed())["out"], out)


def test_raw_inputs_equal_quantized_float_inputs():
    p = fork_program()
    x = feed()["x"]
    q = quantize(x, 1 / 64, 128, "uint8")
    assert np.array_equal(execute(p, {"x": q}, raw_inputs=True, raw_outputs=True)["out"],
                          execute(p, {"x": x}, raw_outputs=True)["out"])


def test_fast_and_reference_kernels_agree_end_to_end():
    p = fork_program()
    for seed in range(5):
        a, ta = execute(p, feed(2, seed), raw_outputs=True, trace=True)
        b, tb = execute(p, feed(2, seed), raw_outputs=True, trace=True, kernels="reference")
        assert ta.keys() == tb.keys() and a.keys() == b.keys()
        assert all(np.array_equal(ta[k], tb[k]) for k in ta)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_float_weight_copies_are_optional():
    """keep_float_weights=False gives the same integers, keeps no float copy of the conv and gemm
    weights, and a later default run builds them again."""
    p = fork_program()
    _, kept = execute(p, feed(2), raw_outputs=True, trace=True)
    assert p.layers[0].__dict__["_fast_plan"].wmats is not None
    _, lean = execute(p, feed(2), raw_outputs=True, trace=True, keep_float_weights=False)
    assert kept.keys() == lean.keys() and all(np.array_equal(kept[k], lean[k]) for k in kept)
    conv_plan, gemm_plan = p.layers[0].__dict__["_fast_plan"], p.layers[-1].__dict__["_fast_plan"]
    assert conv_plan.wmats is None and gemm_plan.wts is None
    _, again = execute(p, feed(2), raw_outputs=True, trace=True)
    assert all(np.array_equal(kept[k], again[k]) for k in kept)
    assert p.layers[0].__dict__["_fast_plan"].wmats is not None


def test_batch_is_generic():
    p = fork_program(batch=1)
    x = feed(batch=3)["x"]
    batched = execute(p, {"x": x}, raw_outputs=True)["out"]
    assert batched.shape == (3, 4)
    singles = [execute(p, {"x": x[i: i + 1]}, raw_outputs=True)["out"] for i in range(3)]
    assert np.array_equal(batched, np.concatenate(singles))


def test_trace_returns_every_layer_output_as_integers():
    p = fork_program()
    outputs, trace = execute(p, feed(), trace=True, raw_outputs=True)
    assert list(trace) == ["a", "b", "s", "g", "f", "out"]
    for name, value in trace.items():
        assert value.dtype == np.dtype(p.tensors[name].dtype)
        assert value.shape == p.tensors[name].shape
    assert np.array_equal(trace["out"], outputs["out"])
    assert trace["a"].min() >= 0  # the fused ReLU: clamp_lo = zp_y = 0


def test_liveness_frees_tensors_after_their_last_reader():
    p = fork_program()
    assert last_uses(p) == {"x": 0, "a": 2, "b": 2, "s": 3, "g": 4, "f": 5}
    stats = {}
    execute(p, feed(), stats=stats)
    # at most a, b and s are alive together (while add1 runs); without freeing it would be 7
    assert stats["peak_live_tensors"] == 3
    assert set(stats["layer_seconds"]) == {l.name for l in p.layers}


def test_feed_errors_name_the_input():
    p = fork_program()
    with pytest.raises(ProgramError, match="input 'x'.*raw feed must be uint8"):
        execute(p, {"x": np.zeros((1, 2, 6, 6), np.int8)}, raw_inputs=True)
    with pytest.raises(ProgramError, match="input 'x'.*shape"):
        execute(p, {"x": np.zeros((1, 2, 5, 6), np.float32)})
    with pytest.raises(ProgramError, match="input 'x'.*float feed expected"):
        execute(p, {"x": np.zeros((1, 2, 6, 6), np.uint8)})
    with pytest.raises(ProgramError, match="missing \\['x'\\]"):
        execute(p, {})
    with pytest.raises(ProgramError, match="kernels must be"):
        execute(p, feed(), kernels="turbo")


def test_unsupported_layers_and_bad_programs_raise_program_error():
    p = fork_program()
    p.layers[1].kind = "tensorcore"
    with pytest.raises(ProgramError, match="layer 'to16'.*unknown kind 'tensorcore'"):
        execute(p, feed())
    p = fork_program()
    p.layers[1].kind = "lut"
    with pytest.raises(ProgramError, match="layer 'to16'.*kind 'lut' and op 'lut' go together"):
        execute(p, feed())
    p = fork_program()
    p.layers[0].op = "fft"
    with pytest.raises(ProgramError, match="layer 'conv1' \\(fft\\): unknown op"):
        execute(p, feed())
    p = fork_program()
    p.layers[1], p.layers[2] = p.layers[2], p.layers[1]
    with pytest.raises(ProgramError, match="layer 'add1'.*'b' is not produced before"):
        execute(p, feed())
    p = fork_program()
    del p.layers[0].params["multiplier"]
    with pytest.raises(ProgramError, match="layer 'conv1' \\(conv\\): missing param 'multiplier'"):
        execute(p, feed())
    p = fork_program()
    p.tensors["a"].shape = (1, 3, 5, 5)
    with pytest.raises(ProgramError, match="layer 'conv1'.*declared uint8\\[1, 3, 5, 5\\]"):
        execute(p, feed())


def test_run_layer_and_small_op_rules():
    # add: acc = (a - zp_a)*m_a + (b - zp_b)*m_b, half-up shift, clamp
    lay = layer("add", inputs=("a", "b"), multiplier=[3, 1], shift=[1], clamp_hi=[5])
    ins = [info("a", "int8", (1, 4), 1.0, 1), info("b", "int8", (1, 4), 1.0, -1)]
    outs = [info("y", "int8", (1, 4), 1.0, 2)]
    p = single_layer_program(lay, ins, outs)
    a = np.array([[1, 2, 0, 10]], np.int8)
    b = np.array([[-1, 0, -4, 10]], np.int8)
    # acc = [0, 4, -6, 38] -> shift 1 half up -> [0, 2, -3, 19] -> +2 -> [2, 4, -1, 21] -> clamp hi 5
    for kernels in ("fast", "reference"):
        assert run_layer(p, lay, [a, b], kernels)[0].tolist() == [[2, 4, -1, 5]]
    # concat: each input requantized into the output's scale
    lay = layer("concat", inputs=("a", "b"), attrs={"axis": 1}, multiplier=[1, 1], shift=[0, 1])
    outs = [info("y", "int8", (1, 8), 1.0, 0)]
    y = run_layer(single_layer_program(lay, ins, outs), lay, [a, b])[0]
    assert y.tolist() == [[0, 1, -1, 9, 0, 1, -1, 6]]  # b - zp_b = [0, 1, -3, 11] -> >>1 half up
    # clamp needs equal qparams in and out
    lay = layer("clamp", inputs=("a",), clamp_lo=[-2], clamp_hi=[3])
    p = single_layer_program(lay, ins[:1], [info("y", "int8", (1, 4), 1.0, 1)])
    assert run_layer(p, lay, [np.array([[-5, 0, 3, 9]], np.int8)])[0].tolist() == [[-2, 0, 3, 3]]
    p = single_layer_program(lay, ins[:1], [info("y", "int8", (1, 4), 2.0, 1)])
    with pytest.raises(ProgramError, match="equal to the input"):
        run_layer(p, lay, [a])
    # requantize: int8 -> int16 with a new zero point
    lay = layer("requantize", inputs=("a",), multiplier=[5], shift=[-2])
    p = single_layer_program(lay, ins[:1], [info("y", "int16", (1, 4), 0.05, 100)])
    assert run_layer(p, lay, [a])[0].tolist() == [[100, 120, 80, 280]]


def test_reshape_carries_the_batch():
    lay = layer("reshape", attrs={"shape": [1, -1]})
    p = single_layer_program(lay, [info("x", "int8", (1, 2, 3), 1.0, 0)], [info("y", "int8", (1, 6), 1.0, 0)])
    x = np.arange(24, dtype=np.int8).reshape(4, 2, 3)
    assert run_layer(p, lay, [x])[0].shape == (4, 6)
    lay = layer("reshape", attrs={"shape": [-1]})
    p = single_layer_program(lay, [info("x", "int8", (1, 2, 3), 1.0, 0)], [info("y", "int8", (6,), 1.0, 0)])
    assert run_layer(p, lay, [x[:1]])[0].shape == (6,)
    with pytest.raises(ProgramError, match="cannot take batch"):
        run_layer(p, lay, [x])


# --- the .qir file ------------------------------------------------------------------------------

def assert_programs_equal(a: Program, b: Program):
    assert (a.inputs, a.outputs, a.metadata, a.version) == (b.inputs, b.outputs, b.metadata, b.version)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        ta, tb = a.tensors[name], b.tensors[name]
        assert (ta.name, ta.dtype, ta.shape, ta.axis) == (tb.name, tb.dtype, tb.shape, tb.axis)
        for x, y in ((ta.scale, tb.scale), (ta.zero_point, tb.zero_point)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        for field in ("name", "op", "kind", "inputs", "outputs", "attrs", "acc_dtype", "rounding", "source_nodes"):
            assert getattr(la, field) == getattr(lb, field), field
        assert sorted(la.params) == sorted(lb.params)
        for key in la.params:
            pa, pb = np.asarray(la.params[key]), lb.params[key]
            assert pa.dtype == pb.dtype and pa.shape == pb.shape and np.array_equal(pa, pb), key


def test_round_trip(tmp_path):
    p = fork_program()
    p.tensors["w_axis"] = info("w_axis", "int8", (3, 2), [0.5, 0.25, 0.125], [0, 1, 2], axis=0)
    p.layers[0].attrs["note"] = "ünïcode"
    p.layers[0].attrs["alpha"] = 0.1
    path = tmp_path / "m.qir"
    runtime.save_program(p, path)
    q = runtime.load_program(path)
    assert_programs_equal(p, q)
    assert np.array_equal(execute(p, feed(), raw_outputs=True)["out"], execute(q, feed(), raw_outputs=True)["out"])
    names = zipfile.ZipFile(path).namelist()
    assert names[0] == "program.json" and all(n.endswith(".npy") for n in names[1:])


def test_saves_are_byte_identical(tmp_path):
    runtime.save_program(fork_program(), tmp_path / "a.qir")
    fork_program().save(tmp_path / "b.qir")  # a separately built, equal program
    runtime.save_program(runtime.load_program(tmp_path / "a.qir"), tmp_path / "c.qir")
    shuffled = fork_program()
    shuffled.tensors = dict(reversed(shuffled.tensors.items()))  # the table's order is not content
    runtime.save_program(shuffled, tmp_path / "e.qir")
    assert (tmp_path / "e.qir").read_bytes() == (tmp_path / "a.qir").read_bytes()
    a = (tmp_path / "a.qir").read_bytes()
    assert a == (tmp_path / "b.qir").read_bytes() == (tmp_path / "c.qir").read_bytes()
    p = fork_program()
    p.layers[0].params["bias"][0] += 1
    runtime.save_program(p, tmp_path / "d.qir")
    assert (tmp_path / "d.qir").read_bytes() != a


def test_large_arrays_are_stored_small_ones_deflated(tmp_path):
    """Members of 64 KiB or more (weights) are stored uncompressed, the rest deflated; both load
    back bit for bit and saving stays byte-identical."""
    p = fork_program()
    big = np.random.default_rng(5).integers(-128, 128, (256, 64, 3, 3)).astype(np.int8)  # 147456 bytes
    p.layers[0].params["weight"] = big
    runtime.save_program(p, tmp_path / "a.qir")
    runtime.save_program(runtime.load_program(tmp_path / "a.qir"), tmp_path / "b.qir")
    assert (tmp_path / "a.qir").read_bytes() == (tmp_path / "b.qir").read_bytes()
    q = runtime.load_program(tmp_path / "a.qir")
    assert q.layers[0].params["weight"].dtype == np.int8
    assert np.array_equal(q.layers[0].params["weight"], big)
    assert_programs_equal(p, q)
    infos = zipfile.ZipFile(tmp_path / "a.qir").infolist()
    stored = [i for i in infos if i.compress_type == zipfile.ZIP_STORED]
    assert [i.file_size for i in stored] == [big.nbytes + 128]  # the .npy header is 128 bytes
    assert all(i.compress_type == zipfile.ZIP_DEFLATED and i.file_size < 1 << 16 for i in infos if i not in stored)
    json_info = next(i for i in infos if i.filename == "program.json")
    assert json_info.compress_size < json_info.file_size


def test_bad_files(tmp_path):
    (tmp_path / "text.qir").write_text("hello")
    with pytest.raises(ProgramError, match="not a .qir file"):
        runtime.load_program(tmp_path / "text.qir")
    with zipfile.ZipFile(tmp_path / "empty.qir", "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(ProgramError, match="no program.json"):
        runtime.load_program(tmp_path / "empty.qir")
    with pytest.raises(ProgramError, match="not a .qir file"):
        runtime.load_program(tmp_path / "missing.qir")

    runtime.save_program(fork_program(), tmp_path / "good.qir")

    def rewrite(name, edit):
        with zipfile.ZipFile(tmp_path / "good.qir") as src, zipfile.ZipFile(tmp_path / name, "w") as dst:
            for member in src.namelist():
                data = src.read(member)
                dst.writestr(member, edit(data) if member == "program.json" else data)
        return tmp_path / name

    newer = rewrite("newer.qir", lambda d: d.replace(b'"version": 1', b'"version": 99'))
    with pytest.raises(ProgramError, match="IR version 99 is not supported.*newer"):
        runtime.load_program(newer)
    other = rewrite("other.qir", lambda d: d.replace(b'"qlower-ir"', b'"something"'))
    with pytest.raises(ProgramError, match="not a .qir file"):
        runtime.load_program(other)
    broken = rewrite("broken.qir", lambda d: d.replace(b'"layers"', b'"layerz"'))
    with pytest.raises(ProgramError, match="malformed program.json"):
        runtime.load_program(broken)


def test_no_pickles_and_no_half_written_files(tmp_path, monkeypatch):
    p = fork_program()
    p.layers[0].params["table"] = np.array([object()], dtype=object)
    with pytest.raises(ProgramError, match="dtype object"):
        runtime.save_program(p, tmp_path / "x.qir")
    assert os.listdir(tmp_path) == []
    runtime.save_program(fork_program(), tmp_path / "x.qir")
    before = (tmp_path / "x.qir").read_bytes()

    def fail(array):
        raise OSError("disk full")

    monkeypatch.setattr(serialize, "_npy_bytes", fail)
    with pytest.raises(OSError, match="disk full"):
        runtime.save_program(fork_program(), tmp_path / "x.qir")
    assert os.listdir(tmp_path) == ["x.qir"]  # the temporary file is gone
    assert (tmp_path / "x.qir").read_bytes() == before  # the old file is untouched


# --- text form ----------------------------------------------------------------------------------

GOLDEN = """\
qlower-ir version 1
meta model = 'tiny'
input  x int8[1,2,2,2] scale=0.0500000007 zp=-3
output y uint8[1,4,2,2] scale=0.0234375 zp=0

layer conv0: conv (integer)
  in   x int8[1,2,2,2] scale=0.0500000007 zp=-3
  out  h int16[1,4,2,2] scale=0.00100000005 zp=0
  attr group = 1
  attr kernel_shape = [1, 1]
  attr pads = [0, 0, 0, 0]
  param bias int32[4] = [10, -20, 30, -40]
  param multiplier int32[4] = [1073741824, 1288490189, 1503238554, 1717986918]
  param shift int8[4] = [30, 30, 30, 30]
  param weight int8[4,2,1,1] = [1, -2, 3, -4, 5, -6, 7, -8]
  acc int32
  rounding half_up
  from Conv_0

layer relu6: requantize (integer)
  in   h int16[1,4,2,2] scale=0.00100000005 zp=0
  out  y uint8[1,4,2,2] scale=0.0234375 zp=0
  param clamp_hi int32[1] = [255]
  param clamp_lo int32[1] = [0]
  param multiplier int32[1] = [2796203]
  param shift int8[1] = [26]
  param table int16[16] min=-8 max=7 [-8, -7, -6, -5, ...] (16 values)
  rounding half_up
  from Relu_1, Clip_2
"""


def tiny_program() -> Program:
    tensors = {
        "x": info("x", "int8", (1, 2, 2, 2), 0.05, -3),
        "h": info("h", "int16", (1, 4, 2, 2), 0.001, 0),
        "y": info("y", "uint8", (1, 4, 2, 2), 6 / 256, 0),
    }
    layers = [
        Layer("conv0", "conv", ["x"], ["h"], attrs={"kernel_shape": [1, 1], "pads": [0, 0, 0, 0], "group": 1},
              params={"weight": np.array([1, -2, 3, -4, 5, -6, 7, -8], np.int8).reshape(4, 2, 1, 1),
                          "bias": np.array([10, -20, 30, -40], np.int32),
                          "multiplier": np.array([2**30, 1288490189, 1503238554, 1717986918], np.int32),
                          "shift": np.full(4, 30, np.int8)},
              acc_dtype="int32", rounding="half_up", source_nodes=["Conv_0"]),
        Layer("relu6", "requantize", ["h"], ["y"],
              params={"multiplier": np.array([2796203], np.int32), "shift": np.array([26], np.int8),
                          "clamp_lo": np.array([0], np.int32), "clamp_hi": np.array([255], np.int32),
                          "table": np.arange(-8, 8, dtype=np.int16)},
              rounding="half_up", source_nodes=["Relu_1", "Clip_2"]),
    ]
    return Program(inputs=["x"], outputs=["y"], tensors=tensors, layers=layers, metadata={"model": "tiny"})


def test_text_form_golden(tmp_path):
    text = runtime.program_to_text(tiny_program())
    assert text == GOLDEN
    runtime.save_program(tiny_program(), tmp_path / "t.qir")
    assert runtime.load_program(tmp_path / "t.qir").to_text() == GOLDEN
