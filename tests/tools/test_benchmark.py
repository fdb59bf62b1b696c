"""The benchmark tool's functions on a tiny model with 2 samples, in-process: every row of the
table is there and holds numbers (no timing asserts: the figures belong to tools/benchmark.py)."""
from __future__ import annotations

import os
import re

from tools import benchmark


def test_benchmark_rows_on_a_tiny_model(tmp_path):
    # MinMax only (the Percentile rows come from the same code with the other method); no
    # quant_pre_process, whose symbolic shape inference imports torch when it is installed
    opts = benchmark.Options(samples=2, large_samples=4, repeats=1, batches=(1, 2), isolate=False, throughput_samples=8,
                             methods=benchmark.METHODS[:1], ort_preprocess=False, latency_threads=(None,))
    lines = []
    rows = benchmark.benchmark_model("resnet_tiny", opts, tmp_path, log=lines.append)
    measures = [r.measure for r in rows]
    number = re.compile(r"^\d+(\.\d+)?$")
    expected = [
        "compile MinMax, N=2 (s)", "  of which qlower's calibration stage (s)", "compile MinMax peak RSS (MB)",
        "latency batch 1, default threads, vs ORT float (ms/sample)",
        "latency batch 1, default threads, vs ORT QDQ (ms/sample)",
        "latency batch 2, default threads, vs ORT float (ms/sample)",
        "latency batch 2, default threads, vs ORT QDQ (ms/sample)",
    ]
    assert measures[:len(expected)] == expected
    throughput = rows[len(expected)]
    cores = os.cpu_count()
    assert throughput.measure == (f"8 samples, batch 2, {cores} cores: {cores} processes (with start-up) "
                                  f"vs ORT float {cores} threads (s)")
    assert all(number.match(v) for v in (throughput.qlower, throughput.onnxruntime, throughput.ratio))
    assert measures[len(expected) + 1].startswith("compile peak RSS N=2 / N=4 (MB;")
    assert measures[-2:] == [f"runtime peak RSS batch 1, keep_float_weights={keep}, above imports (MB)"
                             for keep in (True, False)]
    assert all(number.match(r.qlower) and number.match(r.onnxruntime) for r in rows[-2:])
    assert all(r.model == "resnet_tiny" for r in rows)
    for r in rows[:len(expected)]:
        assert number.match(r.qlower), r
        if "of which" not in r.measure:
            assert number.match(r.onnxruntime) and number.match(r.ratio), r
    assert float(rows[1].qlower) <= float(rows[0].qlower)  # the calibration stage is part of the compile
    assert rows[0].goal == "<= 0.5"
    assert [(m, goal) for m, _, goal in benchmark.METHODS] == [("minmax", 0.5), ("percentile", 0.25)]
    assert any("compile MinMax" in line for line in lines)
    # the ONNX Runtime QDQ model and the qlower program were written where the table says
    assert (tmp_path / "resnet_tiny_minmax" / "model.qir").exists()
    assert (tmp_path / "resnet_tiny_minmax.ort_qdq.onnx").exists()

    table = benchmark.format_table(rows).splitlines()
    assert table[0].split()[:2] == ["model", "measure"] and set(table[1]) <= {"-", " "}
    assert len(table) == len(rows) + 2
    machine = benchmark.machine_lines(None)
    assert "cores" in machine[0] and "BLAS" in machine[1]
