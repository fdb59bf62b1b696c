"""Range estimators against brute-force computations written here: percentile against numpy's
order statistics, the KL divergence against P and Q built bin by bin, the expected squared
error against numerical integration and against quantize-dequantize of the raw samples, and
streaming (batches, R-doubling) against one pass."""
from __future__ import annotations

import numpy as np
import pytest

from compiler import range_estimators as est
from compiler.calibration import AbsHistogram, estimate_range


def _data(seed=0, n=20000):
    """|x| of a long-tailed mixture: a Gaussian bulk, Student-t tails, a few exact zeros."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, n), rng.standard_t(3, n // 10), np.zeros(50)])
    return np.abs(x)


def _histogram(a, num_bins):
    bound = 2.0 ** np.frexp(a.max())[1]
    counts, _ = np.histogram(a, num_bins, (0.0, bound))
    return counts, bound / num_bins


# --------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.99, 100.0])
def test_percentile_brackets_numpy_order_statistic(p):
    a = _data(1)
    counts, w = _histogram(a, 512)
    t = est.percentile_threshold(counts, w, p)
    higher = np.percentile(a, p, method="higher")
    assert higher <= t <= higher + w
    assert t / w == int(t / w)  # a bin edge


# --------------------------------------------------------------------------- entropy


def _kl_direct(counts, i, levels):
    """KL(P || Q) built bin by bin: P = counts[:i] with the rest added to bin i - 1; Q spreads
    each group's clipped count over its non-empty bins, group of bin j = floor(j levels / i)."""
    c = counts.astype(np.float64)
    p = c[:i].copy()
    p[i - 1] += c[i:].sum()
    q = np.zeros(i)
    group = [(j * levels) // i for j in range(i)]
    for g in set(group):
        members = [j for j in range(i) if group[j] == g and c[j] > 0]
        for j in members:
            q[j] = sum(c[m] for m in members) / len(members)
    p, q = p / p.sum(), q / q.sum()
    kl = 0.0
    for pj, qj in zip(p, q):
        if pj > 0:
            if qj == 0:
                return np.inf
            kl += pj * np.log(pj / qj)
    return kl


@pytest.mark.parametrize("levels", [8, 16, 128])
def test_kl_divergences_equal_direct_computation(levels):
    a = _data(2, 3000)
    counts, _ = _histogram(a, 256)
    counts[200] = 0  # an empty bin below the top: its candidate i = 201 is excluded (inf)
    counts[230] += 3
    candidates = np.arange(1, 257)
    fast = est.entropy_divergences(counts, levels, candidates)
    direct = np.array([_kl_direct(counts, i, levels) for i in candidates])
    assert np.isinf(fast[200]) and np.isinf(direct[200])
    finite = np.isfinite(direct)
    np.testing.assert_array_equal(np.isfinite(fast), finite)
    np.testing.assert_allclose(fast[finite], direct[finite], rtol=1e-9, atol=1e-12)


def test_entropy_threshold_is_argmin_of_direct_kl():
    a = _data(3, 5000)
    counts, w = _histogram(a, 512)
    top = int(np.flatnonzero(counts)[-1])
    candidates = np.arange(64, top + 2)
    direct = np.array([_kl_direct(counts, i, 64) for i in candidates])
    t = est.entropy_threshold(counts, w, 64)
    assert t == candidates[int(np.argmin(direct))] * w
    assert t < a.max()  # the t(3) tail is clipped


def test_entropy_with_more_levels_than_bins_clips_nothing():
    counts, w = _histogram(_data(4, 2000), 256)
    top = int(np.flatnonzero(counts)[-1])
    assert est.entropy_threshold(counts, w, 32768) == (top + 1) * w
    # the direct KL agrees: every candidate below the top clips and costs KL > 0
    assert all(_kl_direct(counts, i, 32768) > 0 for i in (top - 20, top - 5, top))
    assert _kl_direct(counts, top + 1, 32768) == 0


# --------------------------------------------------------------------------- mse


def _integrated_error(counts, w, threshold, qmax, points=400):
    """Sum over bins of count x the mean squared quantize-dequantize error over the bin,
    by the midpoint rule on ``points`` points per bin."""
    s = threshold / qmax
    total = 0.0
    for j, c in enumerate(counts):
        if c:
            x = (j + (np.arange(points) + 0.5) / points) * w
            q = np.minimum(np.round(x / s), qmax) * s
            total += c * np.mean((x - q) ** 2)
    return total


@pytest.mark.parametrize("qmax", [127, 255, 7])
def test_expected_error_closed_form_equals_numerical_integral(qmax):
    counts, w = _histogram(_data(5, 3000), 64)
    thresholds = np.array([0.3, 1.0, 2.5, 7.77, 40.0]) * w * 8
    fast = est.expected_sq_errors(counts, w, thresholds, qmax)
    slow = np.array([_integrated_error(counts, w, t, qmax) for t in thresholds])
    np.testing.assert_allclose(fast, slow, rtol=2e-3)  # midpoint rule error, 400 points a bin


def _raw_error(a, threshold, qmax):
    s = threshold / qmax
    return float(((a - np.minimum(np.round(a / s), qmax) * s) ** 2).sum())


@pytest.mark.parametrize("qmax", [127, 255])
def test_mse_threshold_against_brute_force_on_raw_samples(qmax):
    """Every bin edge as a candidate, each evaluated by quantize-dequantize of the raw values:
    the chosen threshold's raw error is within 1% of the best candidate's (the histogram's
    uniform-within-bin model is all that differs), and its expected error is the least."""
    a = _data(6)
    counts, w = _histogram(a, 2048)
    top = int(np.flatnonzero(counts)[-1])
    candidates = np.arange(1, top + 2) * w
    raw = np.array([_raw_error(a, t, qmax) for t in candidates])
    chosen = est.mse_threshold(counts, w, qmax)
    assert _raw_error(a, chosen, qmax) <= 1.01 * raw.min()
    model = est.expected_sq_errors(counts, w, candidates, qmax)
    assert est.expected_sq_errors(counts, w, [chosen], qmax)[0] <= model.min() * (1 + 1e-9)
    assert w < chosen < a.max()


def test_power_of_two_candidates_brute_force():
    a = _data(7)
    counts, w = _histogram(a, 2048)
    up = 2.0 ** np.ceil(np.log2(a.max() / 127))
    scales = [up, up / 2, up / 4]
    raw = [_raw_error(a, 127 * s, 127) for s in scales]
    assert est.best_power_of_two_scale(counts, w, 127, up) == scales[int(np.argmin(raw))]
    with pytest.raises(ValueError, match="power of two"):
        est.best_power_of_two_scale(counts, w, 127, 0.3)


def test_empty_histogram_gives_zero():
    counts = np.zeros(16)
    assert est.percentile_threshold(counts, 0.5, 99) == 0.0
    assert est.entropy_threshold(counts, 0.5, 8) == 0.0
    assert est.mse_threshold(counts, 0.5, 127) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        est.mse_threshold(-np.ones(4), 1.0, 127)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_streaming_equals_one_batch(method):
    """Batches whose magnitude grows (R doubles on the way) give the same counts, zeros and
    estimate as one batch of everything, exactly."""
    rng = np.random.default_rng(8)
    batches = [rng.normal(0, 0.05 * 3.0 ** k, 3000).astype(np.float32) for k in range(5)]
    batches[2][:40] = 0.0
    streamed, whole = AbsHistogram(), AbsHistogram()
    for b in batches:
        streamed.update(b)
    whole.update(np.concatenate(batches))
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert (streamed.bound, streamed.zeros, streamed.total) == (whole.bound, 40, 15000)
    for qmax in (127, 255):
        assert estimate_range(streamed, method, qmax, 99.9) == estimate_range(whole, method,
                                                                              qmax, 99.9)
