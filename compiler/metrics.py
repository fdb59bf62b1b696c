"""Accuracy measures of a quantized program against the float model."""
from __future__ import annotations

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum(ref^2) / sum((ref - test)^2)), in dB."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = ref - np.asarray(test, dtype=np.float64)
    signal_power, noise_power = float(np.sum(ref * ref)), float(np.sum(noise * noise))
    if noise_power == 0.0:
        return float("inf")
    if signal_power == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal_power / noise_power))


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Fraction of samples (axis 0) whose argmax over the last axis is the same."""
    ref = np.asarray(reference).reshape(len(reference), -1)
    tst = np.asarray(test).reshape(len(test), -1)
    return float(np.mean(ref.argmax(axis=1) == tst.argmax(axis=1)))
