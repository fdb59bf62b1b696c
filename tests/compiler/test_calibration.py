"""Range collection: min/max exactly as onnxruntime computes them on all samples at once, the
streaming histogram exact under R-doubling and within one bin of brute-force percentiles, and
memory that does not grow with the number of samples."""
from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from compiler.calibration import (MinMaxObserver, StreamingHistogram, TensorRange,
                                  collect_ranges)
from compiler.calibration_data import load_calibration, model_input_specs
from compiler.errors import CompileError
from tools.model_zoo import calibration_samples, gemm_head_net, mobilenetv2_tiny, save_npz

N = 16
NUM_BINS = 2048


@pytest.fixture(scope="module", params=["mobilenetv2_tiny", "gemm_head_net"])
def case(request):
    model = {"mobilenetv2_tiny": mobilenetv2_tiny, "gemm_head_net": gemm_head_net}[request.param]()
    samples = calibration_samples(model, N, seed=3)
    names = ["input"] + [n.output[0] for n in model.graph.node]
    reference = dict(zip(names, [samples["input"]] + _run_all_at_once(model, names[1:], samples)))
    return model, samples, names, reference


def _run_all_at_once(model, names, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    """Every named tensor, from one onnxruntime run on all samples as one batch."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def _bin_width(values, num_bins=NUM_BINS):
    """The streaming histogram's final bin width: R is the smallest power of two above max|x|."""
    peak = float(np.abs(values).max())
    bound = 2.0 ** (np.frexp(peak)[1]) if peak > 0 else 2.0 ** -24
    return 2 * bound / num_bins


# --------------------------------------------------------------------------- collect_ranges


@pytest.mark.parametrize("batch_size", [1, 3])  # 3 leaves a partial last batch
def test_minmax_equals_onnxruntime_on_all_samples(case, batch_size):
    model, samples, names, reference = case
    data = load_calibration(samples, model_input_specs(model))
    ranges = collect_ranges(model, names, data, method="minmax", batch_size=batch_size)
    assert list(ranges) == names
    for name in names:
        expected = TensorRange(float(reference[name].min()), float(reference[name].max()),
                               "minmax")
        assert ranges[name] == expected, name  # exact: same kernels, same float32 values


def test_requested_tensors_are_the_unoptimised_values(case):
    """onnxruntime's optimisations (Conv+BN, Conv+Relu fusion) do not swallow a requested
    tensor: ranges agree with a run with all optimisations off, to float32 rounding (the
    kernels differ: 1e-5 relative to the tensor's magnitude)."""
    model, samples, names, _ = case
    plain = dict(zip(names[1:], _run_all_at_once(model, names[1:], samples,
                                                 ort.GraphOptimizationLevel.ORT_DISABLE_ALL)))
    ranges = collect_ranges(model, names[1:], load_calibration(samples, model_input_specs(model)))
    for name, x in plain.items():
        tol = 1e-5 * max(1.0, float(np.abs(x).max()))
        assert abs(ranges[name].min - x.min()) <= tol and abs(ranges[name].max - x.max()) <= tol


@pytest.mark.parametrize("p", [99.99, 99.0, 90.0])
def test_percentile_within_one_bin_of_brute_force(case, p):
    model, samples, names, reference = case
    data = load_calibration(samples, model_input_specs(model))
    ranges = collect_ranges(model, names, data, method="percentile", percentile=p, batch_size=2)
    for name in names:
        x = reference[name].ravel()
        w = _bin_width(x)
        higher = np.percentile(x, p, method="higher")
        lower = np.percentile(x, 100 - p, method="lower")
        r = ranges[name]
        assert r.method == "percentile"
        # conservative, and at most one bin width w = 2R/num_bins outside the exact order statistic
        assert higher <= r.max <= higher + w, (name, r.max, higher, w)
        assert lower - w <= r.min <= lower, (name, r.min, lower, w)
        if x.min() >= 0:
            assert r.min >= 0, name  # ReLU / ReLU6 outputs stay non-negative


def test_unknown_and_constant_names_refused(case):
    model, samples, names, _ = case
    data = load_calibration(samples, model_input_specs(model))
    with pytest.raises(CompileError, match="no tensor named 'nope'"):
        collect_ranges(model, [names[3], "nope"], data)
    weight = next(i.name for i in model.graph.initializer if i.name.endswith(".weight"))
    with pytest.raises(CompileError, match=f"'{weight}' are initializers"):
        collect_ranges(model, [weight], data)


def test_bad_options_refused(case):
    model, samples, names, _ = case
    data = load_calibration(samples, model_input_specs(model))
    with pytest.raises(CompileError, match="unknown calibration method 'kl'"):
        collect_ranges(model, names[:2], data, method="kl")
    with pytest.raises(CompileError, match="percentile must be in"):
        collect_ranges(model, names[:2], data, method="percentile", percentile=40)
    with pytest.raises(CompileError, match="power of two"):
        collect_ranges(model, names[:2], data, method="percentile", num_bins=1000)


def _tiny(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_non_finite_tensor_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    model = _tiny([helper.make_node("Log", ["x"], ["logx"], name="log")], [x],
                  [helper.make_tensor_value_info("logx", TensorProto.FLOAT, [1, 4])])
    data = load_calibration({"x": np.array([[1, 2, 3, 4], [0, 1, 2, 3]], np.float32)},
                            model_input_specs(model))
    for method in ("minmax", "percentile"):
        with pytest.raises(CompileError, match=r"tensor 'logx' on calibration samples 1\.\.1: "
                                               r"1 non-finite"):
            collect_ranges(model, ["logx"], data, method=method)


def test_hard_coded_batch_one_needs_batch_size_one():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    shape = onnx.numpy_helper.from_array(np.array([1, 2, 2], np.int64), "shape")
    model = _tiny([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")], [x],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2])], [shape])
    data = load_calibration({"x": np.arange(16, dtype=np.float32).reshape(4, 4)},
                            model_input_specs(model))
    assert collect_ranges(model, ["y"], data)["y"] == TensorRange(0.0, 15.0, "minmax")
    with pytest.raises(CompileError, match=r"try batch_size=1"):
        collect_ranges(model, ["y"], data, batch_size=2)


def test_data_for_another_model_refused(case):
    model, _, names, _ = case
    data = load_calibration({"other": np.zeros((2, 3), np.float32)},
                            {"other": ((1, 3), np.dtype(np.float32))})
    with pytest.raises(CompileError, match="has inputs"):
        collect_ranges(model, names[:2], data)


def test_memory_does_not_grow_with_samples(tmp_path):
    """Peak Python-side allocation (numpy buffers included; tracemalloc does not see
    onnxruntime's C++ arena, which one batch sizes anyway) is the same for N and 4N samples
    streamed from an .npz: the 3N extra samples alone are 590 KB, and keeping the outputs
    would add megabytes."""
    model = mobilenetv2_tiny()
    names = ["input"] + [n.output[0] for n in model.graph.node]
    specs = model_input_specs(model)
    peaks = {}
    for n in (N, 4 * N):
        path = tmp_path / f"calib{n}.npz"
        save_npz(path, calibration_samples(model, n, seed=0))
        data = load_calibration(path, specs)
        for method in ("minmax", "percentile"):
            tracemalloc.start()
            try:
                collect_ranges(model, names, data, method=method, batch_size=2)
                peaks[n, method] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    slack = 32 * 1024  # allocator noise: a few small Python objects
    for method in ("minmax", "percentile"):
        assert peaks[4 * N, method] <= peaks[N, method] + slack, peaks


# --------------------------------------------------------------------------- observers (numpy)


def test_histogram_doubling_is_exact():
    """Batches of growing magnitude double R several times; the merged counts equal a histogram
    computed in one go over the final range, bin for bin."""
    rng = np.random.default_rng(0)
    hist = StreamingHistogram(num_bins=256)
    batches = [rng.normal(0, 0.01 * 4.0 ** k, 500).astype(np.float32) for k in range(6)]
    batches.append(np.array([0.0, -0.0, 1e-30, -1e-30], np.float32))  # around the centre edge
    bounds = []
    for b in batches:
        hist.update(b)
        bounds.append(hist.bound)
    assert len(set(bounds)) >= 5  # R doubled (repeatedly) along the way
    everything = np.concatenate(batches).astype(np.float64)
    direct, _ = np.histogram(everything, bins=256, range=(-hist.bound, hist.bound))
    np.testing.assert_array_equal(hist.counts, direct)
    assert hist.total == everything.size
    assert hist.min == everything.min() and hist.max == everything.max()


def test_histogram_values_on_bin_edges_exact():
    """Values exactly on bin edges (multiples of w) land in the bin they open, before and after
    merging, as np.histogram puts them."""
    hist = StreamingHistogram(num_bins=16)
    first = np.arange(-7, 8, dtype=np.float32) / 8  # R = 1, w = 1/8: every value an edge
    hist.update(first)
    np.testing.assert_array_equal(hist.counts, np.histogram(first, 16, (-1, 1))[0])
    second = np.array([3.0, -3.5, 0.25], np.float32)  # R -> 4
    hist.update(second)
    both = np.concatenate([first, second])
    np.testing.assert_array_equal(hist.counts, np.histogram(both, 16, (-4, 4))[0])


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.9, 100.0])
def test_histogram_percentiles_against_brute_force(p):
    """Tolerance: one bin width w = 2R/num_bins, on the conservative side of numpy's
    method="higher"/"lower" order statistics."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(1.0, 2.0, 700), rng.standard_t(2, 300)]).astype(np.float32)
    hist = StreamingHistogram(num_bins=64)
    for chunk in np.array_split(x, 7):
        hist.update(chunk)
    w = hist.bin_width
    assert w == _bin_width(x, 64)
    lo, hi = hist.percentile_range(p)
    higher = np.percentile(x, p, method="higher")
    lower = np.percentile(x, 100 - p, method="lower")
    assert higher <= hi <= higher + w
    assert lower - w <= lo <= lower
    if p == 100.0:
        assert (lo, hi) == (x.min(), x.max())


def test_histogram_non_negative_and_fixed_state():
    rng = np.random.default_rng(2)
    hist = StreamingHistogram()
    for _ in range(20):
        hist.update(np.maximum(rng.normal(size=1000), 0))
        assert hist.counts.shape == (2048,) and hist.counts.dtype == np.int64
    lo, hi = hist.percentile_range(99.9)
    assert lo == 0.0 and 0 < hi <= hist.max


def test_histogram_rejects_bad_input():
    with pytest.raises(ValueError, match="power of two"):
        StreamingHistogram(num_bins=100)
    hist = StreamingHistogram()
    with pytest.raises(ValueError, match="1 non-finite"):
        hist.update(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="no values"):
        hist.percentile_range(99)
    hist.update(np.zeros(3))  # all zeros: a tiny R, then exact doubling when data arrives
    hist.update(np.array([5.0]))
    assert hist.percentile_range(100) == (0.0, 5.0)
    np.testing.assert_array_equal(hist.counts, np.histogram([0, 0, 0, 5.0], 2048,
                                                            (-hist.bound, hist.bound))[0])


def test_minmax_observer():
    obs = MinMaxObserver()
    obs.update(np.array([1.0, -2.0]))
    obs.update(np.zeros((0,)))
    obs.update(np.array([[3.5]]))
    assert obs.range() == (-2.0, 3.5)
    with pytest.raises(ValueError, match="non-finite"):
        obs.update(np.array([np.inf]))
