"""DumpInstrument: one loadable ONNX file per pass run and a summary line per run."""
import onnx
from graphs import make_model, ops
from onnx import helper
from test_pipeline import small_net

from compiler.dump import SUMMARY_FILE, DumpInstrument, dump_file_name
from passes.base import PassRecord
from passes.pipeline import default_passes, run_default_pipeline


def test_dump_writes_numbered_models_and_summary(tmp_path):
    dump_dir = tmp_path / "not" / "yet" / "there"
    model, _ = small_net()
    dump = DumpInstrument(dump_dir)
    result = run_default_pipeline(model, instruments=(dump,))
    names = [p.name for p in default_passes()]
    expected = [f"{i + 1:02d}_{names[i % len(names)]}.onnx" for i in range(len(result.records))]
    assert sorted(p.name for p in dump_dir.glob("*.onnx")) == expected
    for record, file_name in zip(result.records, expected):
        dumped = onnx.load(str(dump_dir / file_name))
        onnx.checker.check_model(dumped)
        assert len(dumped.graph.node) == record.nodes_after
    final = onnx.load(str(dump_dir / expected[-1]))
    assert ops(final) == ops(result.model)
    lines = (dump_dir / SUMMARY_FILE).read_text().splitlines()
    assert len(lines) == 1 + len(result.records)
    assert lines[0].startswith(f"# qlower pass dump: {len(result.records)} pass runs in 2 rounds")
    assert lines[1:] == [r.summary_line() for r in result.records]
    assert "01 name_nodes" in lines[1] and "named 2 unnamed nodes" in lines[1]
    assert dump.written[-1] == dump_dir / SUMMARY_FILE


def test_dump_file_name_is_safe():
    record = PassRecord(7, 1, "my pass/v2", 1, 1, False, [], 0.0)
    assert dump_file_name(record) == "07_my_pass_v2.onnx"


def test_summary_with_no_records(tmp_path):
    dump = DumpInstrument(tmp_path)
    dump.finish([])
    assert (tmp_path / SUMMARY_FILE).read_text() == "# qlower pass dump: 0 pass runs in 0 rounds, no passes run\n"


def test_dump_after_a_single_pass(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])])
    dump = DumpInstrument(tmp_path)
    record = PassRecord(1, 1, "name_nodes", 1, 1, True, ["named 1 unnamed nodes"], 0.001)
    dump.after_pass(record, model)
    dump.finish([record])
    assert onnx.load(str(tmp_path / "01_name_nodes.onnx")).graph.node[0].op_type == "Relu"
    assert (tmp_path / SUMMARY_FILE).read_text().splitlines()[1] == record.summary_line()
