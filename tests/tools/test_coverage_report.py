"""tools.coverage_report: the table has one row per model with its integer/float layer counts and
both targets' SQNR, and a model that cannot be compiled is a row naming the node and op."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.coverage_report import main


def test_table_rows_for_a_zoo_model_and_an_unusable_file(tmp_path, capsys):
    lrn_net = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("LRN", ["c"], ["y"], name="lrn", size=3)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])
    good = helper.make_model(lrn_net, opset_imports=[helper.make_opsetid("", 13)])
    good.ir_version = 8
    onnx.save(good, str(tmp_path / "lrn_net.onnx"))
    bad_graph = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["y"], name="hm", axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    bad = helper.make_model(bad_graph, opset_imports=[helper.make_opsetid("", 13)])
    bad.ir_version = 8
    onnx.save(bad, str(tmp_path / "hardmax.onnx"))
    out = tmp_path / "table.md"
    rc = main(["--corpus", "--model", str(tmp_path / "lrn_net.onnx"), str(tmp_path / "hardmax.onnx"),
               "--calib", "4", "--eval", "2", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text in capsys.readouterr().out  # the same table is printed
    row = next(line for line in text.splitlines() if line.startswith("| lrn_net.onnx"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:3] == ["1", "1"]  # conv integer, LRN float
    assert "LRN: op unsupported (no integer lowering for LRN)" in cells[3]
    assert float(cells[4]) > 20 and float(cells[5]) > 15  # one conv + LRN: SQNR of an 8-bit output
    bad_row = next(line for line in text.splitlines() if line.startswith("| hardmax.onnx"))
    assert "ERROR" in bad_row and "node 'hm' (Hardmax)" in bad_row
    assert "ops still not lowered (float layers over all models): LRN (1)" in text
