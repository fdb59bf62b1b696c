"""Range estimators: pure numpy functions from a histogram of |x| to a clipping threshold T.

The histogram is ``counts[j]`` = number of values with |x| in [j w, (j + 1) w), j = 0 .. B - 1
(``compiler.calibration.AbsHistogram`` builds it, streaming). Why |x|: ``compiler.scales``
encodes a tensor whose minimum is >= 0 with an unsigned grid {0, s, .., qmax s} (qmax = 255 for
8 bits), and any other tensor with a symmetric grid {-qmax s, .., qmax s} (qmax = 127): in both
cases the error of a value depends on |x| alone, so one histogram of |x| serves both, and the
threshold T gives the scale s = T / qmax.

- ``percentile_threshold``: the p-th percentile of |x|, rounded up to its bin's top edge.
- ``entropy_threshold``: TensorRT's calibration (Migacz, "8-bit inference with TensorRT", GTC
  2017): the T = i w minimising KL(P || Q), P the first i bins with everything above folded into
  the last one, Q those i bins merged into ``levels`` groups and spread back evenly over each
  group's non-empty bins.
- ``mse_threshold``: the T minimising the expected squared error of quantize-dequantize
  (rounding inside [0, T], clipping above), each bin's values taken as spread uniformly over it.
- ``best_power_of_two_scale``: for power-of-2 targets, the exponent with the least expected
  squared error among the non-clipping one and the few below it.

Each threshold function returns 0.0 for an empty histogram; callers clamp T to the exact max|x|.
"""
from __future__ import annotations

import functools
import math

import numpy as np

_CHUNK_ELEMENTS = 1 << 15  # bound on the (candidates x bins) work arrays: 256 KB of float64, cache-sized


def _checked(counts, width: float) -> tuple[np.ndarray, int]:
    """counts as float64 and the index of the last non-empty bin (-1 if all are empty)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {c.shape}")
    if not width > 0:
        raise ValueError(f"bin width must be positive, got {width}")
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    nonzero = np.flatnonzero(c)
    return c, int(nonzero[-1]) if nonzero.size else -1


def percentile_threshold(counts, width: float, percentile: float) -> float:
    """Top edge of the bin holding the p-th percentile of |x|.

    With n values sorted as a_0 <= .. <= a_(n-1) and r = ceil((n - 1) p / 100) (numpy's
    ``method="higher"``), the result is (j + 1) w for the bin j holding a_r, so
    a_r <= T <= a_r + w.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    c, top = _checked(counts, width)
    if top < 0:
        return 0.0
    cumulative = np.cumsum(c)
    last = cumulative[-1] - 1
    rank = min(last, math.ceil(last * (np.float64(percentile) / 100)))
    j = int(np.searchsorted(cumulative, rank + 1))  # first bin whose running count exceeds rank
    return (j + 1) * width


def _xlogx(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v * np.log(np.where(v > 0, v, 1.0))


@functools.lru_cache(maxsize=8)
def _group_bounds(levels: int, max_bins: int) -> np.ndarray:
    """Row i: ceil(g i / levels) for g = 0 .. levels, the first bin of each of the ``levels``
    groups of i bins (bin j is in group floor(j levels / i)). Cached: the same for every tensor."""
    i = np.arange(max_bins + 1, dtype=np.int64)[:, None]
    g = np.arange(levels + 1, dtype=np.int64)[None, :]
    bounds = (-((-g * i) // levels)).astype(np.int32)
    bounds.setflags(write=False)
    return bounds


def entropy_divergences(counts, levels: int, candidates) -> np.ndarray:
    """KL(P_i || Q_i) for each candidate i (the number of bins kept; T = i w), TensorRT's way.

    P_i: counts[:i], with the mass of every bin >= i added to bin i - 1, normalised.
    Q_i: bin j < i belongs to group floor(j levels / i); each group's clipped count S_g is spread
    evenly over its n_g non-empty bins (empty bins stay empty), normalised by C_i =
    sum(counts[:i]). Grouping by ranks makes the sums closed-form from prefix sums, O(levels)
    per candidate. With N the total count and O = N - C_i the clipped mass:

        N KL = sum_j N p_j log(N p_j) - N log N
               - sum_g S_g log(S_g / (n_g C_i)) - O log(S_g* / (n_g* C_i))

    g* the group of bin i - 1. A candidate whose bin i - 1 is empty while values lie above it
    has q_(i-1) = 0 < p_(i-1): KL = inf (never chosen).
    """
    c = np.asarray(counts, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.size and (cand.min() < 1 or cand.max() > c.size):
        raise ValueError(f"candidates must be in 1..{c.size}")
    # levels >= i puts every bin in a group of its own; levels = len(counts) does the same for
    # every candidate, with bounded work.
    levels = min(levels, c.size)
    prefix = np.concatenate([[0.0], np.cumsum(c)])
    nonzero = np.concatenate([[0], np.cumsum(c > 0)]).astype(np.int32)
    xlogx = np.concatenate([[0.0], np.cumsum(_xlogx(c))])
    log_int = np.log(np.maximum(np.arange(c.size + 1), 1))  # log n, and 0 for n = 0
    total = prefix[-1]
    bounds = _group_bounds(levels, c.size)
    out = np.empty(cand.size)
    step = max(1, _CHUNK_ELEMENTS // (levels + 1))
    for start in range(0, cand.size, step):
        i = cand[start:start + step]
        b = bounds[i]
        p = prefix[b]
        s = p[:, 1:] - p[:, :-1]
        z = nonzero[b]
        n = z[:, 1:] - z[:, :-1]
        kept = prefix[i]
        outliers = total - kept
        last = c[i - 1]
        # sum_g S_g log(S_g / (n_g C_i)) = sum_g S_g log S_g - sum_g S_g log n_g - C_i log C_i,
        # every term 0 for an empty group (S_g = n_g = 0)
        s_log_s = np.einsum("kg,kg->k", s, np.log(np.maximum(s, 1e-300)))
        s_log_n = np.einsum("kg,kg->k", s, log_int[n])
        rows = np.arange(i.size)
        g_last = ((i - 1) * levels) // i
        s_last = np.maximum(s[rows, g_last], 1e-300)
        safe_kept = np.maximum(kept, 1e-300)
        log_q_last = np.log(s_last) - log_int[n[rows, g_last]] - np.log(safe_kept)
        sum_plogq = s_log_s - s_log_n - _xlogx(kept) + outliers * log_q_last
        sum_plogp = xlogx[i - 1] + _xlogx(last + outliers) - total * math.log(total)
        kl = (sum_plogp - sum_plogq) / total
        kl[(last == 0) & (outliers > 0)] = np.inf
        out[start:start + step] = np.maximum(kl, 0.0)  # >= 0 exactly (Gibbs); clamp float noise
    return out


def entropy_threshold(counts, width: float, levels: int) -> float:
    """T = i w for the candidate i in [levels, top + 1] with the least KL(P_i || Q_i)
    (``entropy_divergences``; ties go to the smaller T), top the last non-empty bin: as TensorRT,
    which starts at i = 128 of 2048 bins. ``levels`` is the number of quantized bins on |x|: 128
    for int8, 256 for uint8. With ``levels`` > top (16-bit), Q_i is the clipped P_i itself, any
    clipping costs KL > 0 (Gibbs), and T = (top + 1) w clips nothing."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    c, top = _checked(counts, width)
    if top < 0:
        return 0.0
    if levels >= top + 1:  # Q_i = clipped P: KL > 0 whenever something is clipped (Gibbs)
        return float((top + 1) * width)
    cand = np.arange(levels, top + 2)
    kl = entropy_divergences(c, levels, cand)
    return float(cand[int(np.argmin(kl))] * width)


def _sq_error_integral(x: np.ndarray, threshold: np.ndarray, step: np.ndarray) -> np.ndarray:
    """H(x) = integral over [0, x] of e(t)^2 dt, e the quantize-dequantize error of a grid of
    ``step`` clipped at ``threshold`` (a multiple of step): e(t) = t - step round(t / step) below
    the threshold, t - threshold above. With k = round(x / s), r = x - k s in [-s/2, s/2]:
    G(x) = k s^3 / 12 + r^3 / 3 (each whole period adds s^3 / 12), and
    H(x) = G(min(x, T)) + max(x - T, 0)^3 / 3."""
    inside = np.minimum(x, threshold)
    k = np.round(inside / step)
    r = inside - k * step
    above = np.maximum(x - threshold, 0.0)
    return k * (step * step * step / 12) + (r * r * r + above * above * above) / 3


def expected_sq_errors(counts, width: float, thresholds, qmax: int) -> np.ndarray:
    """Sum over all values of the expected squared quantize-dequantize error, for each threshold
    T (grid step T / qmax, clipped at T), each bin's count spread uniformly over the bin:

        E(T) = sum_j counts[j] (H(e_(j+1)) - H(e_j)) / w      (``_sq_error_integral``)
    """
    c = np.asarray(counts, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if (t <= 0).any():
        raise ValueError("thresholds must be positive")
    used = np.flatnonzero(c)
    if used.size == 0:
        return np.zeros(t.size)
    c = c[:used[-1] + 1]
    edges = width * np.arange(c.size + 1, dtype=np.float64)
    out = np.empty(t.size)
    step = max(1, _CHUNK_ELEMENTS // (c.size + 1))
    for start in range(0, t.size, step):
        ts = t[start:start + step, None]
        h = _sq_error_integral(edges[None, :], ts, ts / qmax)
        out[start:start + step] = (np.diff(h, axis=1) @ c) / width
    return out


def mse_threshold(counts, width: float, qmax: int) -> float:
    """The bin edge T = i w, 1 <= i <= top + 1, with the least ``expected_sq_errors`` (ties to
    the smaller T), top the last non-empty bin. Searched coarse to fine: about 32 edges spread
    over the whole range, then 16 edges spaced 8 times closer around the best, and so on down
    to single bins. This finds the global minimum when E(T) has a single minimum at each
    resolution, as the trade-off of rounding error (growing with T) against clipping error
    (shrinking) gives on real activations; ~70 evaluations instead of top + 1."""
    c, top = _checked(counts, width)
    if top < 0:
        return 0.0
    n = top + 1
    stride = 1 << max(0, math.ceil(math.log2(n / 32)))  # a power of two, so each level divides it
    grid = np.unique(np.append(np.arange(stride, n + 1, stride), n))
    best = int(grid[int(np.argmin(expected_sq_errors(c, width, grid * width, qmax)))])
    while stride > 1:
        finer = max(1, stride // 8)
        grid = np.arange(max(1, best - stride), min(n, best + stride) + 1, finer)
        grid = np.unique(np.append(grid, best))
        best = int(grid[int(np.argmin(expected_sq_errors(c, width, grid * width, qmax)))])
        stride = finer
    return float(best * width)


def best_power_of_two_scale(counts, width: float, qmax: int, scale: float,
                            below: int = 2) -> float:
    """Among s = ``scale`` (a power of two that does not clip) and s / 2, .., s / 2^below, the
    one with the least ``expected_sq_errors`` (threshold qmax s); ties keep the larger scale."""
    exponent = math.log2(scale)
    if exponent != round(exponent):
        raise ValueError(f"scale must be a power of two, got {scale}")
    c, top = _checked(counts, width)
    if top < 0:
        return scale
    candidates = scale / 2.0 ** np.arange(below + 1)
    errors = expected_sq_errors(c, width, qmax * candidates, qmax)
    return float(candidates[int(np.argmin(errors))])
