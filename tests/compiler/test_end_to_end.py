"""End to end on the builder's models, both targets: the integer runtime against the QDQ model in
onnxruntime (per layer, exactly but for genuine ties; end to end, statistically) and against the
float model (SQNR thresholds a broken scale fails), with negative controls that show the checks
can fail."""
from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest

from compiler.api import compile_model
from compiler.metrics import sqnr_db
from compiler.onnx_runner import make_session
from compiler.verify import check_layers
from tools import model_zoo

MODELS = ["resnet_tiny", "mobilenetv2_tiny", "gemm_head_net"]
TARGETS = ["mmav2", "mmav1"]
EVAL_SAMPLES = 8

# Output SQNR vs float below which a compile counts as broken. Measured on these models (see the
# closing note of the skeleton issue): mmav2 14-30 dB, mmav1 a few dB lower; a doubled multiplier
# in one layer drops them far below (test_doubled_multiplier_fails_the_checks).
MIN_SQNR_DB = {"mmav2": 10.0, "mmav1": 7.0}


@cache
def compiled(model_name: str, target: str, multiplier_bits: int | None = None):
    model = model_zoo.MODELS[model_name]()
    calib = model_zoo.calibration_samples(model, 16, seed=0)
    evaluation = model_zoo.calibration_samples(model, EVAL_SAMPLES, seed=1)
    return compile_model(model, target, calib, multiplier_bits=multiplier_bits), evaluation


def run_program(program, evaluation):
    return program.run(evaluation)


def float_and_qdq(result, evaluation):
    out = result.program.outputs[0]
    sessions = [make_session(result.source_model, optimize=True), make_session(result.qdq_model, optimize=False),
                make_session(result.qdq_model, optimize=True)]
    rows = [[], [], []]
    for i in range(len(evaluation["input"])):
        feed = {"input": evaluation["input"][i:i + 1]}
        for session, row in zip(sessions, rows):
            row.append(session.run([out], feed)[0])
    return tuple(np.concatenate(r) for r in rows)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_layer_matches_the_qdq_model(model_name, target):
    result, evaluation = compiled(model_name, target)
    checks = check_layers(result, {"input": evaluation["input"][:1]})
    assert len(checks) == len(result.program.layers)
    failing = [c for c in checks if not c.ok]
    assert not failing, failing
    if result.target.power_of_two:
        # Power-of-2 scales make exact ties common (every odd value before a 1-bit shift): the
        # IR rounds them half up (TIDL), QuantizeLinear half to even. Each must be an exact tie.
        assert max(c.worst_excused_tie_distance for c in checks) < 1e-9
    elif result.target.multiplier_bits <= 16:
        # A short multiplier (TIDL's 8 bits) makes m / 2^k a fraction with few bits, so exact ties
        # (acc * m mod 2^k == 2^(k-1)) are common too; each excused one is a tie up to float32 noise.
        assert max(c.worst_excused_tie_distance for c in checks) < 1e-4
    else:
        # With non-power-of-2 scales ties are rare: the excuse is not a blanket tolerance.
        total = sum(c.elements for c in checks)
        assert sum(c.mismatches for c in checks) <= 0.001 * total


@pytest.mark.parametrize("model_name", MODELS)
def test_end_to_end_statistics_mmav2(model_name):
    # With 31-bit multipliers (no exact ties to speak of): the runtime's SQNR is within 0.5 dB of
    # the QDQ model's, and it agrees with the QDQ model at least as closely as onnxruntime's two
    # modes agree with each other.
    result, evaluation = compiled(model_name, "mmav2", 31)
    ref, qdq_off, qdq_on = float_and_qdq(result, evaluation)
    ours = run_program(result.program, evaluation)[result.program.outputs[0]]
    ours_sqnr, qdq_sqnr = sqnr_db(ref, ours), sqnr_db(ref, qdq_off)
    assert ours_sqnr >= MIN_SQNR_DB["mmav2"]
    assert abs(ours_sqnr - qdq_sqnr) <= 0.5
    assert sqnr_db(qdq_off, ours) >= sqnr_db(qdq_off, qdq_on)
    # TIDL's 8-bit multiplier (the default) makes m / 2^k a fraction with few bits, so exact ties
    # are common (each one checked per layer); onnxruntime's float32 emulation resolves them
    # either way and the differences propagate, as on mmav1. End to end it must stay accurate
    # against float and close to the QDQ model (measured 29-42 dB on these models).
    result, evaluation = compiled(model_name, "mmav2")
    ref, qdq_off, _ = float_and_qdq(result, evaluation)
    ours = run_program(result.program, evaluation)[result.program.outputs[0]]
    assert sqnr_db(ref, ours) >= MIN_SQNR_DB["mmav2"]
    assert sqnr_db(qdq_off, ours) >= 20.0


def _with_rounding(program, rounding):
    changed = copy.deepcopy(program)
    for layer in changed.layers:
        if layer.rounding:
            layer.rounding = rounding
    return changed


@pytest.mark.parametrize("model_name", MODELS)
def test_end_to_end_mmav1_differs_from_qdq_only_by_the_tie_rule(model_name):
    """On mmav1 the QDQ model cannot describe round-half-up at the (frequent, exact) ties of
    power-of-2 requantization. The same program with ties to even (ONNX's rule) must reproduce the
    QDQ model exactly, end to end; the half-up program must stay accurate against float."""
    result, evaluation = compiled(model_name, "mmav1")
    ref, qdq_off, _ = float_and_qdq(result, evaluation)
    out = result.program.outputs[0]
    half_even = _with_rounding(result.program, "half_even").run(evaluation, raw=True)[out]
    info = result.program.tensors[out]
    qdq_ints = np.rint(qdq_off / info.scale[0]).astype(np.int64) + int(info.zero_point[0])
    np.testing.assert_array_equal(half_even.astype(np.int64), qdq_ints)
    ours = run_program(result.program, evaluation)[out]
    assert sqnr_db(ref, ours) >= MIN_SQNR_DB["mmav1"]
    assert sqnr_db(qdq_off, ours) >= 12.0


def test_reference_kernels_agree_with_fast_kernels_end_to_end():
    result, evaluation = compiled("mobilenetv2_tiny", "mmav2")
    fast = result.program.run(evaluation, raw=True)
    reference = result.program.run(evaluation, raw=True, kernels="reference")
    for name in fast:
        np.testing.assert_array_equal(fast[name], reference[name])


def _with_doubled_multiplier(program):
    broken = copy.deepcopy(program)
    layer = next(l for l in broken.layers if l.op == "conv" and l.name.startswith("block1"))
    layer.params["multiplier"] = layer.params["multiplier"] * 2
    return broken, layer.name


def test_doubled_multiplier_fails_the_checks():
    result, evaluation = compiled("mobilenetv2_tiny", "mmav2")
    broken, name = _with_doubled_multiplier(result.program)
    checks = {c.layer: c for c in check_layers(result, {"input": evaluation["input"][:1]}, program=broken)}
    assert not checks[name].ok and checks[name].unexcused > 0.1 * checks[name].elements
    ref, _, _ = float_and_qdq(result, evaluation)
    assert sqnr_db(ref, broken.run(evaluation)[broken.outputs[0]]) < MIN_SQNR_DB["mmav2"]


def test_dropped_rounding_term_fails_the_layer_check(monkeypatch):
    import runtime.fixed_point as fp

    def floor_shift(acc, k):  # (a*m) >> k with no 2^(k-1): truncation instead of rounding
        acc, k = np.asarray(acc, np.int64), np.asarray(k, np.int64)
        return np.left_shift(np.right_shift(acc, np.maximum(k, 0)), np.maximum(-k, 0))

    result, evaluation = compiled("mobilenetv2_tiny", "mmav2")
    monkeypatch.setattr(fp, "shift_round_half_up", floor_shift)
    # the reference kernels: the fast ones fuse their own requantization (checked bit for bit
    # against the reference in tests/runtime/test_fast_kernels.py), so the patch would miss them
    checks = check_layers(result, {"input": evaluation["input"][:1]}, kernels="reference")
    assert sum(not c.ok for c in checks if c.op in ("conv", "gemm")) >= 10


def test_two_compiles_give_identical_program_bytes(tmp_path):
    model = model_zoo.mobilenetv2_tiny()
    calib = model_zoo.calibration_samples(model, 8, seed=0)
    compile_model(model, "mmav2", calib).save(tmp_path / "a")
    compile_model(model, "mmav2", calib).save(tmp_path / "b")
    assert (tmp_path / "a" / "model.qir").read_bytes() == (tmp_path / "b" / "model.qir").read_bytes()
    assert (tmp_path / "a" / "model.qdq.onnx").read_bytes() == (tmp_path / "b" / "model.qdq.onnx").read_bytes()
