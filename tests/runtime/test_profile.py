"""runtime/profile.py: layer kinds, multiply-accumulate counts (worked out by hand from the layer
shapes), and the table built from per-layer seconds (given here, so nothing depends on timing)."""
from __future__ import annotations

import numpy as np
import pytest
from runtime_test_helpers import fork_program

from runtime import execute
from runtime.ir import Layer
from runtime.profile import Profile, layer_kind, layer_macs


def _conv(weight_shape, **attrs) -> Layer:
    return Layer("c", "conv", ["x"], ["y"], attrs=attrs, params={"weight": np.zeros(weight_shape, np.int8)})


@pytest.mark.parametrize(("layer", "kind"), [
    (_conv((8, 4, 3, 3), strides=[1, 1]), "conv 3x3"),
    (_conv((8, 4, 3, 3), strides=[2, 2]), "conv 3x3 s2"),
    (_conv((8, 4, 1, 1)), "conv 1x1"),
    (_conv((8, 1, 3, 3), group=8, strides=[2, 2]), "conv dw 3x3 s2"),
    (_conv((8, 2, 5, 5), group=4), "conv 5x5"),  # grouped, not depthwise
    (_conv((8, 4, 1, 7)), "conv 1x7"),
    (Layer("a", "add", ["x", "z"], ["y"]), "add"),
])
def test_layer_kind(layer, kind):
    assert layer_kind(layer) == kind


def test_macs_of_the_fork_program_by_hand():
    program = fork_program(batch=3)  # the batch does not count: MACs are per sample
    macs = {layer.name: layer_macs(program, layer) for layer in program.layers}
    # conv1: 3 output channels x 6x6 positions, each 2 input channels x 3x3 taps
    assert macs["conv1"] == 3 * 6 * 6 * 2 * 3 * 3
    # fc: 4 outputs, each a dot product over 3 inputs
    assert macs["fc"] == 4 * 3
    assert macs["add1"] == macs["pool"] == macs["flat"] == macs["to16"] == 0


def test_table_leaves_out_the_first_batch_and_ranks_layers():
    program = fork_program()
    profile = Profile(program)
    names = [layer.name for layer in program.layers]
    profile.add({"layer_seconds": dict.fromkeys(names, 1.0)}, samples=2)  # the first batch: left out
    profile.add({"layer_seconds": {**dict.fromkeys(names, 0.001), "conv1": 0.006}}, samples=2)
    profile.add({"layer_seconds": {**dict.fromkeys(names, 0.001), "conv1": 0.004}}, samples=3)
    rows = {r["name"]: r for r in profile.rows()}
    assert rows["conv1"]["seconds"] == pytest.approx(0.010)
    assert rows["fc"]["seconds"] == pytest.approx(0.002)
    text = profile.table()
    lines = text.splitlines()
    # 5 samples in 2 batches; 10 ms + 5 layers x 2 ms = 20 ms in layers, 4 ms per sample
    assert lines[0].startswith("profile: 5 samples in 2 batch(es) (after the first")
    assert "20.0 ms in layers, 4.00 ms/sample" in lines[0]
    layer_lines = lines[lines.index(next(l for l in lines if l.lstrip().startswith("layer "))) + 1:]
    assert layer_lines[0].split()[0] == "conv1"  # slowest first
    conv = layer_lines[0].split()
    # conv1: 2 ms/sample, 50% of the time, 1944 MAC x 5 samples / 10 ms = 0.00097 GMAC/s (shown as 0.0)
    assert conv[-3:] == ["2.000", "50.0", "0.0"]
    add = next(l for l in layer_lines if l.split()[0] == "add1").split()
    assert add[-3:] == ["0.400", "10.0", "-"]  # no products: no rate
    kinds = lines[2:lines.index(next(l for l in lines if l.lstrip().startswith("layer ")))]
    assert kinds[0].split()[:2] == ["conv", "3x3"]


def test_rate_is_macs_per_sample_times_samples_over_seconds():
    program = fork_program()
    profile = Profile(program)
    names = [layer.name for layer in program.layers]
    for seconds in (1.0, 2 * 1944e-9, 1944e-9):  # the first batch is left out
        profile.add({"layer_seconds": {**dict.fromkeys(names, 1e-6), "conv1": seconds}}, samples=2)
    # conv1: 1944 MAC per sample, 4 samples in 3 * 1944 ns: 4/3 GMAC/s
    conv = next(line for line in profile.table().splitlines() if line.split()[0] == "conv1")
    assert conv.split()[-1] == "1.3"


def test_table_with_one_batch_says_it_includes_preparation_and_top_limits_rows():
    program = fork_program()
    profile = Profile(program)
    profile.add({"layer_seconds": {layer.name: 0.001 * (i + 1) for i, layer in enumerate(program.layers)}}, samples=1)
    text = profile.table(top=2)
    assert "the only one, which includes preparing" in text
    assert text.splitlines()[-1] == "  ... 4 faster layer(s) not shown"
    shown = text.splitlines()[-3:-1]
    assert [l.split()[0] for l in shown] == ["fc", "flat"]  # the two last layers took longest


def test_profile_from_real_runs_covers_every_layer():
    program = fork_program(batch=2)
    rng = np.random.default_rng(1)
    profile = Profile(program)
    for _ in range(2):
        stats = {}
        execute(program, {"x": rng.integers(0, 256, (2, 2, 6, 6)).astype(np.uint8)}, raw_inputs=True, stats=stats)
        profile.add(stats, samples=2)
    rows = profile.rows()
    assert [r["name"] for r in rows] == [layer.name for layer in program.layers]
    assert all(r["seconds"] > 0 for r in rows)
    assert rows[0]["shape"] == (3, 6, 6)
