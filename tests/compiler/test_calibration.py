"""Range collection: min/max exactly as onnxruntime computes them on all samples at once; the
streaming |x| histogram exact under R-doubling and the same whatever the batching; each
histogram method equal to its estimator applied to a histogram built here independently; NaN
caught although onnxruntime's ReduceMin/ReduceMax skip it; memory that does not grow with the
number of samples; power-of-2 exponents chosen by brute-force MSE."""
from __future__ import annotations

import threading
import time
import tracemalloc
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from compiler import calibration
from compiler import range_estimators as est
from compiler.calibration import (
    AbsHistogram,
    MinMaxObserver,
    TensorRange,
    _copy_with_weights_in_memory,
    _Overlap,
    collect_ranges,
    default_qmax,
    estimate_range,
)
from compiler.calibration_data import load_calibration, model_input_specs
from compiler.errors import CompileError
from compiler.scales import activation_qparams
from passes.targets import get_target
from tools.model_zoo import (
    calibration_samples,
    gemm_head_net,
    mobilenetv2_tiny,
    save_npz,
)

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


def _bound(values):
    """The streaming histogram's final R: the smallest power of two above max|x|."""
    peak = float(np.abs(values).max())
    return 2.0 ** (np.frexp(peak)[1]) if peak > 0 else 2.0 ** -24


def _abs_histogram(values, num_bins=NUM_BINS):
    """|x| counted over [0, R) by np.histogram (independent of AbsHistogram), and the width."""
    bound = _bound(values)
    counts, _ = np.histogram(np.abs(np.asarray(values, np.float64)), num_bins, (0.0, bound))
    return counts, bound / num_bins


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
    """T is the p-th percentile of |x| (numpy's method="higher"), rounded up by at most one bin
    width w = R / num_bins; the range is [max(min, -T), min(max, T)]."""
    model, samples, names, reference = case
    data = load_calibration(samples, model_input_specs(model))
    ranges = collect_ranges(model, names, data, method="percentile", percentile=p, batch_size=2)
    for name in names:
        x = reference[name].ravel()
        w = _bound(x) / NUM_BINS
        higher = np.percentile(np.abs(x), p, method="higher")
        r = ranges[name]
        assert r.method == "percentile"
        threshold = max(-r.min, r.max)
        assert higher <= threshold <= min(higher + w, np.abs(x).max()), (name, threshold, higher)
        assert r.min == max(x.min(), -threshold) and r.max == min(x.max(), threshold), name
        assert (r.min >= 0) == (x.min() >= 0), name  # ReLU / ReLU6 outputs stay non-negative


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_equal_estimator_on_independent_histogram(case, method):
    """Streaming in batches of 3 (a partial last batch) gives exactly the histogram np.histogram
    makes from all samples at once, so the range equals the estimator applied to that one."""
    model, samples, names, reference = case
    data = load_calibration(samples, model_input_specs(model))
    ranges = collect_ranges(model, names, data, method=method, batch_size=3)
    for name in names:
        x = reference[name].ravel()
        counts, w = _abs_histogram(x)
        r = ranges[name]
        np.testing.assert_array_equal(r.histogram.counts, counts, err_msg=name)
        assert r.histogram.bin_width == w
        qmax = 255 if x.min() >= 0 else 127
        assert r.qmax == qmax
        if method == "percentile":  # the percentile does not read the zero count: not counted
            assert r.histogram.zeros is None
            with pytest.raises(ValueError, match="count_zeros=False"):
                estimate_range(r.histogram, "mse", qmax)
            threshold = est.percentile_threshold(counts, w, 99.99)
        else:  # exact zeros are exact on any grid: the error-based methods leave them out
            assert r.histogram.zeros == np.count_nonzero(x == 0)
            nonzero = counts.copy()
            nonzero[0] -= np.count_nonzero(x == 0)
            threshold = (est.entropy_threshold(nonzero, w, qmax + 1) if method == "entropy"
                         else est.mse_threshold(nonzero, w, qmax))
        threshold = min(threshold, float(np.abs(x).max()))
        assert (r.min, r.max) == (max(float(x.min()), -threshold), min(float(x.max()), threshold))
        # re-estimated for a 16-bit grid: as many levels as bins, so entropy clips nothing
        wide = r.for_grid(default_qmax(x.min() >= 0, 16))
        if method == "entropy":
            assert (wide.min, wide.max) == (float(x.min()), float(x.max()))
        if method == "percentile":
            assert wide == r


@pytest.mark.parametrize("cpus", [1, 3])
def test_concurrent_runs_change_nothing(case, cpus, monkeypatch):
    """One run at a time (1 CPU) or two concurrent runs with 1 thread each (3 CPUs) give the
    same ranges and histograms as this machine's setting, batch after batch in sample order."""
    model, samples, names, _ = case
    data = load_calibration(samples, model_input_specs(model))
    here = {m: collect_ranges(model, names, data, method=m, batch_size=3) for m in ("minmax", "mse")}
    monkeypatch.setattr(calibration, "_usable_cpus", lambda: cpus)
    session = calibration._CalibrationSession(model, names[1:], 1, False)
    assert session.concurrent_runs == (1 if cpus == 1 else 2)
    for method, expected in here.items():
        got = collect_ranges(model, names, data, method=method, batch_size=3)
        for name in names:
            assert got[name] == expected[name], (method, name)
            if method == "mse":
                np.testing.assert_array_equal(got[name].histogram.counts, expected[name].histogram.counts)
                assert got[name].histogram.zeros == expected[name].histogram.zeros


def test_batching_does_not_change_histograms(case):
    model, samples, names, _ = case
    data = load_calibration(samples, model_input_specs(model))
    one = collect_ranges(model, names, data, method="entropy", batch_size=1)
    five = collect_ranges(model, names, data, method="entropy", batch_size=5)
    for name in names:
        assert one[name] == five[name]
        np.testing.assert_array_equal(one[name].histogram.counts, five[name].histogram.counts)


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
        collect_ranges(model, names[:2], data, method="entropy", num_bins=1000)
    with pytest.raises(CompileError, match="power of two"):
        collect_ranges(model, names[:2], data, method="mse", num_bins=1 << 16)


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


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_nan_caught_although_reduce_min_max_skip_it(method):
    """Sqrt(-1) = NaN: onnxruntime's ReduceMin/ReduceMax ignore NaN at most positions (checked
    here), so the calibration graph's ReduceSum is what catches it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])
    model = _tiny([helper.make_node("Sqrt", ["x"], ["r"], name="sqrt")], [x],
                  [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 6])])
    values = np.array([[1, 4, 9, 16, 25, 36], [1, 4, -1, 16, 25, 36]], np.float32)
    sess = ort.InferenceSession(_tiny(
        [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0)], [x],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, None)]).SerializeToString(),
        providers=["CPUExecutionProvider"])
    with np.errstate(invalid="ignore"):
        assert np.isfinite(sess.run(None, {"x": np.sqrt(values[1:])})[0])  # the premise
    data = load_calibration({"x": values}, model_input_specs(model))
    with pytest.raises(CompileError, match=r"tensor 'r' on calibration samples 1\.\.1: "
                                           r"1 non-finite"):
        collect_ranges(model, ["r"], data, method=method)


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


def test_error_on_an_early_batch_names_its_samples():
    """With a histogram method batch k is counted on a worker thread while batch k + 1 runs:
    an error on an early batch still names that batch, and no worker thread is left behind."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    model = _tiny([helper.make_node("Log", ["x"], ["logx"], name="log")], [x],
                  [helper.make_tensor_value_info("logx", TensorProto.FLOAT, [1, 4])])
    values = np.array([[1, 2, 3, 4], [1, 0, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]], np.float32)
    data = load_calibration({"x": values}, model_input_specs(model))
    threads = threading.active_count()
    for method in ("percentile", "entropy"):
        with pytest.raises(CompileError, match=r"tensor 'logx' on calibration samples 1\.\.1: "
                                               r"1 non-finite"):
            collect_ranges(model, ["logx"], data, method=method)
    assert threading.active_count() == threads


def test_overlap_keeps_order_errors_and_two_batches():
    """``_Overlap``: calls in submission order; after ``submit(k)`` returns, batch k - 2's
    arguments are released (memory bounded by two batches); an error surfaces at the next
    ``submit`` or on leaving the block."""
    class Batch:
        def __init__(self, i):
            self.i = i

    seen, refs = [], []

    def work(batch):
        time.sleep(0.01 if batch.i == 0 else 0)
        seen.append(batch.i)

    with _Overlap() as overlap:
        for i in range(5):
            batch = Batch(i)
            refs.append(weakref.ref(batch))
            overlap.submit(work, batch)
            del batch
            if i >= 2:
                assert refs[i - 2]() is None, i
    assert seen == [0, 1, 2, 3, 4]

    def fail(batch):
        if batch.i == 1:
            raise ValueError("batch one")

    with pytest.raises(ValueError, match="batch one"), _Overlap() as overlap:
        for i in range(4):
            overlap.submit(fail, Batch(i))
    with pytest.raises(ValueError, match="batch one"), _Overlap() as overlap:  # raised on exit
        for i in range(2):
            overlap.submit(fail, Batch(i))
    inline = []
    with _Overlap(enabled=False) as overlap:
        overlap.submit(inline.append, 7)
        assert inline == [7]  # ran before submit returned


class _RefillingData:
    """A data set whose ``batches`` refills one buffer for every batch (as a loader reusing its
    memory may), so a batch's feed changes as soon as the next batch is read."""

    origin = "a refilled buffer"

    def __init__(self, samples):
        self.samples, self.num_samples, self.input_names = samples, len(samples), ["x"]

    def batches(self, batch_size=1):
        buffer = np.empty((1,) + self.samples.shape[1:], self.samples.dtype)
        for sample in self.samples:
            buffer[0] = sample
            yield {"x": buffer}
        buffer[...] = 1e6  # what a late reader of the last batch would see


def test_results_unaffected_by_a_refilled_feed_buffer():
    """Batch k is still being run (concurrent runs) or counted (the histogram worker) when batch
    k + 1 is read: each batch's feeds are copied first, so the graph input's histogram is
    np.histogram's over all samples and every range is onnxruntime's on all samples at once."""
    model = _dense_net()
    samples = np.random.default_rng(10).normal(0, 1, (8, 64)).astype(np.float32)
    reference = dict(zip(["r", "out"], _run_all_at_once(model, ["r", "out"], {"x": samples})))
    x = collect_ranges(model, ["x", "r"], _RefillingData(samples), method="percentile")["x"]
    np.testing.assert_array_equal(x.histogram.counts, _abs_histogram(samples)[0])
    assert (x.histogram.min, x.histogram.max) == (samples.min(), samples.max())
    ranges = collect_ranges(model, ["x", "r", "out"], _RefillingData(samples))
    assert ranges["x"] == TensorRange(float(samples.min()), float(samples.max()), "minmax")
    for name, values in reference.items():
        assert ranges[name] == TensorRange(float(values.min()), float(values.max()), "minmax")


def _dense_net():
    """x (1, 64) -> MatMul w1 (64 x 128 float32, 32 KB) -> Add b (128 floats) -> Relu -> MatMul
    w2 (128 x 32, 16 KB) -> Reshape [-1, 4, 8] (a 24-byte shape constant)."""
    rng = np.random.default_rng(8)
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.2, (64, 128)).astype(np.float32), "w1"),
             onnx.numpy_helper.from_array(rng.normal(0, 0.1, 128).astype(np.float32), "b"),
             onnx.numpy_helper.from_array(rng.normal(0, 0.2, (128, 32)).astype(np.float32), "w2"),
             onnx.numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
             helper.make_node("Reshape", ["y", "shape"], ["out"], name="reshape")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8])
    return _tiny(nodes, [x], [out], inits)


def test_large_weights_read_from_memory_give_onnxruntime_values():
    """The session reads the 32 KB and 16 KB weights from memory (stubs marked external in the
    model bytes), keeps the small constants inline, leaves the caller's model untouched, and
    computes what onnxruntime computes on the original model: min/max exactly, and the
    histogram np.histogram makes from those values."""
    model = _dense_net()
    before = model.SerializeToString()
    copy, names, values = _copy_with_weights_in_memory(model)
    assert names == ["w1", "w2"] and len(values) == 2
    stubs = {i.name: i for i in copy.graph.initializer}
    for name in names:
        assert stubs[name].data_location == TensorProto.EXTERNAL and not stubs[name].raw_data
        assert list(stubs[name].dims) == list(next(i for i in model.graph.initializer if i.name == name).dims)
    assert [n.name for n in copy.graph.node] == [n.name for n in model.graph.node]
    assert stubs["shape"] == next(i for i in model.graph.initializer if i.name == "shape")
    assert model.SerializeToString() == before

    samples = {"x": np.random.default_rng(9).normal(0, 1, (6, 64)).astype(np.float32)}
    tensors = ["h", "r", "y", "out"]
    reference = dict(zip(tensors, _run_all_at_once(model, tensors, samples)))
    data = load_calibration(samples, model_input_specs(model))
    minmax = collect_ranges(model, tensors, data)
    percentile = collect_ranges(model, tensors, data, method="percentile")
    for name in tensors:
        x = reference[name]
        assert minmax[name] == TensorRange(float(x.min()), float(x.max()), "minmax"), name
        np.testing.assert_array_equal(percentile[name].histogram.counts, _abs_histogram(x)[0])
    assert model.SerializeToString() == before


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
    of |x| computed in one go over the final range, bin for bin."""
    rng = np.random.default_rng(0)
    hist = AbsHistogram(num_bins=256)
    batches = [rng.normal(0, 0.01 * 4.0 ** k, 500).astype(np.float32) for k in range(6)]
    batches.append(np.array([0.0, -0.0, 1e-30, -1e-30], np.float32))  # around 0
    bounds = []
    for b in batches:
        hist.update(b)
        bounds.append(hist.bound)
    assert len(set(bounds)) >= 5  # R doubled (repeatedly) along the way
    everything = np.concatenate(batches).astype(np.float64)
    direct, _ = np.histogram(np.abs(everything), bins=256, range=(0, hist.bound))
    np.testing.assert_array_equal(hist.counts, direct)
    assert hist.total == everything.size
    assert hist.min == everything.min() and hist.max == everything.max()
    assert hist.peak == np.abs(everything).max()


def test_histogram_values_on_bin_edges_exact():
    """Values exactly on bin edges (multiples of w), of either sign, land in the bin they open,
    before and after merging, as np.histogram puts them."""
    hist = AbsHistogram(num_bins=16)
    first = np.arange(-15, 16, dtype=np.float32) / 16  # R = 1, w = 1/16: every |x| an edge
    hist.update(first)
    np.testing.assert_array_equal(hist.counts, np.histogram(np.abs(first), 16, (0, 1))[0])
    second = np.array([3.0, -3.5, 0.25], np.float32)  # R -> 4
    hist.update(second)
    both = np.abs(np.concatenate([first, second]))
    np.testing.assert_array_equal(hist.counts, np.histogram(both, 16, (0, 4))[0])


def test_histogram_zero_count_and_tiny_values():
    """``zeros`` counts +0.0 and -0.0, and no subnormal or tiny value, in every input type, in
    batches with negative values (|x| path) and without (x read directly, -0.0 included); the
    tiny values land in bin 0 with them. The first batch's R is itself subnormal-sized, where
    1/w overflows the float type. ``count_zeros=False`` leaves the counts as they are."""
    for dtype, tiny in ((np.float32, 1e-45), (np.float64, 5e-324), (np.float16, 6e-8)):
        x = np.array([0.0, -0.0, tiny, -tiny, 0.5, -0.25, 0.0, 3.0, -0.0, tiny, 0.0, 6.5], dtype)
        assert x[2] != 0  # the premise: the smallest subnormal of the type
        batches = (x[:4], x[4:8], x[8:])  # the last one has no negative value but -0.0
        hist, no_zeros = AbsHistogram(num_bins=16), AbsHistogram(num_bins=16, count_zeros=False)
        for batch in batches:
            hist.update(batch)
            no_zeros.update(batch)
        assert hist.zeros == 5 and no_zeros.zeros is None, dtype
        expected, _ = np.histogram(np.abs(x.astype(np.float64)), 16, (0, hist.bound))
        np.testing.assert_array_equal(hist.counts, expected)
        np.testing.assert_array_equal(no_zeros.counts, expected)


def test_histogram_float64_and_float16_inputs():
    rng = np.random.default_rng(5)
    for dtype in (np.float64, np.float16):
        x = rng.normal(0, 3, 4000).astype(dtype)
        hist = AbsHistogram(num_bins=64)
        for chunk in np.array_split(x, 5):
            hist.update(chunk)
        expected, _ = np.histogram(np.abs(x.astype(np.float64)), 64, (0, hist.bound))
        np.testing.assert_array_equal(hist.counts, expected)


def test_histogram_fixed_state_and_non_negative():
    rng = np.random.default_rng(2)
    hist = AbsHistogram()
    for _ in range(20):
        hist.update(np.maximum(rng.normal(size=1000), 0))
        assert hist.counts.shape == (2048,) and hist.counts.dtype == np.int64
    lo, hi = estimate_range(hist, "percentile", 255, 99.9)
    assert lo == 0.0 and 0 < hi <= hist.max


def test_histogram_rejects_bad_input():
    with pytest.raises(ValueError, match="power of two"):
        AbsHistogram(num_bins=100)
    with pytest.raises(ValueError, match="power of two"):
        AbsHistogram(num_bins=1 << 16)
    hist = AbsHistogram()
    with pytest.raises(ValueError, match="1 non-finite"):
        hist.update(np.array([1.0, np.nan]))
    hist.update(np.zeros(3))  # all zeros: a tiny R, then exact doubling when data arrives
    hist.update(np.array([5.0]))
    assert estimate_range(hist, "percentile", 127, 100) == (0.0, 5.0)
    np.testing.assert_array_equal(hist.counts, np.histogram([0, 0, 0, 5.0], 2048,
                                                            (0, hist.bound))[0])


def test_estimate_range_signs():
    """lo keeps the data minimum's sign and max(|lo|, |hi|) = T <= max|x|."""
    rng = np.random.default_rng(3)
    hist = AbsHistogram()  # R = 16, w = 1/128: entropy's first candidate is T = 128 w = 1
    hist.update(np.concatenate([rng.normal(0, 1, 5000), [-12.0, 3.0]]))
    for method in ("percentile", "entropy", "mse"):
        lo, hi = estimate_range(hist, method, 127, 99.9)
        threshold = max(-lo, hi)
        assert lo < 0 and 0 < threshold < 12.0, method  # the lone outlier is clipped
        assert hi == min(hist.max, threshold) and lo == max(hist.min, -threshold)
    with pytest.raises(ValueError, match="does not read a histogram"):
        estimate_range(hist, "minmax", 127)


def test_minmax_observer():
    obs = MinMaxObserver()
    obs.update(np.array([1.0, -2.0]))
    obs.update(np.zeros((0,)))
    obs.update(np.array([[3.5]]))
    assert obs.range() == (-2.0, 3.5)
    with pytest.raises(ValueError, match="non-finite"):
        obs.update(np.array([np.inf]))


# --------------------------------------------------------------------------- scales: power of 2


def _raw_sq_error(x, scale, qmax):
    """Quantize-dequantize on the raw values (symmetric grid, clipped at +-qmax)."""
    q = np.clip(np.round(x / scale), -qmax, qmax)
    return float(((x - q * scale) ** 2).sum())


def test_power_of_two_exponent_minimizes_brute_force_mse():
    """mmav1: a long-tailed tensor whose round-up exponent wastes most levels on one outlier; the
    chosen exponent is the one of {e, e-1, e-2} with the least squared error on the raw values,
    and minmax (no histogram) keeps the round-up one."""
    mmav1 = get_target("mmav1")
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 1.0, 20000), [17.0]]).astype(np.float32)
    hist = AbsHistogram()
    hist.update(x)
    rng_hist = TensorRange(float(x.min()), float(x.max()), "mse", hist, 127)
    up = 2.0 ** np.ceil(np.log2(17.0 / 127))
    candidates = [up, up / 2, up / 4]
    errors = [_raw_sq_error(x.astype(np.float64), s, 127) for s in candidates]
    assert min(errors) < 0.8 * errors[0]  # the premise: clipping the outlier pays
    qp = activation_qparams(TensorRange(float(x.min()), float(x.max()), "percentile", hist, 127,
                                        100.0), mmav1, "t")
    assert float(qp.scale[0]) == candidates[int(np.argmin(errors))]
    plain = activation_qparams(TensorRange(float(x.min()), float(x.max()), "minmax"), mmav1, "t")
    assert float(plain.scale[0]) == up
    assert rng_hist.for_grid(127) is rng_hist


# --------------------------------------------------------------------------- progress bar


def test_progress_bar_on_request_and_off_when_not_a_terminal(case, capsys):
    model, samples, names, _ = case
    data = load_calibration(samples, model_input_specs(model))
    collect_ranges(model, names[:3], data, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and f"/{N} " in err  # the bar, with the number of samples
    collect_ranges(model, names[:3], data)  # None: stderr is captured, not a terminal
    collect_ranges(model, names[:3], data, progress=False)
    assert capsys.readouterr().err == ""
