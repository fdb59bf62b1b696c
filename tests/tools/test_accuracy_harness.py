"""The accuracy harness's pieces on a tiny zoo model, in-process (the full tool is run by hand:
it compiles real models and onnxruntime's quantizer, which takes minutes)."""
from __future__ import annotations

import numpy as np
import pytest

from compiler.metrics import sqnr_db
from tools import model_zoo
from tools.accuracy_harness import (
    Case,
    agreement,
    format_table,
    ort_row,
    parse_config,
    qlower_row,
)


def test_parse_config():
    assert parse_config("mmav1:percentile:eq+bc+clip=3") == (
        "qlower mmav1:percentile:eq+bc+clip=3",
        {"target": "mmav1", "calib_method": "percentile", "equalize": True, "bias_correction": True,
         "weight_clip": 3.0})
    assert parse_config("mmav2")[1] == {"target": "mmav2", "calib_method": "minmax"}
    with pytest.raises(ValueError, match="unknown flag 'zz'"):
        parse_config("mmav2:minmax:zz")


def test_agreement_by_output_shape():
    ref = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert agreement(ref, np.array([[0.2, 0.7], [0.1, 0.3]])) == 0.5
    seq = np.zeros((1, 4, 3))
    seq[0, :, 1] = 1
    got = seq.copy()
    got[0, 0, 2] = 2
    assert agreement(seq, got) == 0.75
    assert agreement(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4))) is None


@pytest.fixture(scope="module")
def case():
    model = model_zoo.MODELS["gemm_head_net"]()
    return Case("gemm_head_net", model.SerializeToString(), model_zoo.calibration_samples(model, 8, 0),
                model_zoo.calibration_samples(model, 8, 1), None, True)


def test_rows_and_table(case):
    ours = qlower_row(case, "mmav2:minmax:bc", runtime=True)
    peer = ort_row(case, "int8", "MinMax")
    for row in (ours, peer):
        assert np.isfinite(row["qdq_db"]) and row["qdq_db"] > 10.0  # a real quantized model, not a copy
        assert row["compile_s"] > 0 and row["peak_mb"] >= row["base_mb"] > 0
    assert abs(ours["rt_db"] - ours["qdq_db"]) < 3.0  # the runtime follows its QDQ model
    text = format_table(case, [ours, peer], 8, 8)
    assert "qlower mmav2:minmax:bc" in text and "ORT quantize_static int8 MinMax" in text
    margin = ours["qdq_db"] - peer["qdq_db"]
    assert f"({margin:+.2f} dB)" in text
    assert ("NOT met" in text) == (margin < 1.0)


def test_sqnr_column_is_the_metric(case):
    """The QDQ column is 10 log10(signal / noise) of the concatenated outputs, recomputed here."""
    from tools.accuracy_harness import _compare

    ref = {"y": np.array([[1.0, 2.0], [3.0, 4.0]])}
    got = {"y": np.array([[1.0, 2.5], [3.0, 4.0]])}
    db, top1 = _compare(ref, got)
    assert db == pytest.approx(10 * np.log10(30.0 / 0.25))
    assert db == pytest.approx(sqnr_db(ref["y"], got["y"]))
    assert top1 == 1.0
