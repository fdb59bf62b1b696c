"""runtime/batches.py: a data set in batches, in this process or in worker processes, gives the
integers of one run on the whole array; errors in workers come back as ProgramError."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from runtime_test_helpers import fork_program

from runtime import ProgramError
from runtime.batches import run_batches


def _data(samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # x is uint8 with scale 1/64, zero point 128: floats in [-2, 2)
    return {"x": rng.uniform(-2.0, 2.0, (samples, 2, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("raw", [False, True])
def test_batches_in_one_process_equal_one_run(raw):
    program = fork_program()
    data = _data(7)
    whole = program.run(data, raw=raw)
    seen = []
    got = run_batches(program, data, batch_size=3, raw=raw, on_batch=lambda stats, n: seen.append(n))
    assert seen == [3, 3, 1]
    assert got.keys() == whole.keys()
    for name in whole:
        assert got[name].dtype == whole[name].dtype
        np.testing.assert_array_equal(got[name], whole[name])


def test_worker_processes_equal_one_process():
    program = fork_program()
    data = _data(11, seed=1)
    one = run_batches(program, data, batch_size=2, raw=True)
    two = run_batches(program, data, batch_size=2, jobs=2, raw=True)
    np.testing.assert_array_equal(two["out"], one["out"])
    assert two["out"].shape == (11, 4)


def test_a_worker_error_comes_back_as_program_error():
    program = fork_program()
    bad = {"x": np.zeros((4, 2, 5, 5), np.float32)}  # 5x5 maps where the program declares 6x6
    with pytest.raises(ProgramError, match="input 'x'"):
        run_batches(program, bad, batch_size=2, jobs=2)


@pytest.mark.parametrize(("data", "kwargs", "message"), [
    ({"x": np.zeros((0, 2, 6, 6), np.float32)}, {}, "no samples"),
    ({"x": np.zeros((3, 2, 6, 6), np.float32)}, {"batch_size": 0}, "at least 1"),
    ({"x": np.zeros((3, 2, 6, 6), np.float32)}, {"jobs": 0}, "at least 1"),
    ({"x": np.zeros((3, 2, 6, 6), np.float32)}, {"jobs": 2, "on_batch": print}, "jobs=1"),
])
def test_bad_requests(data, kwargs, message):
    with pytest.raises(ProgramError, match=message):
        run_batches(fork_program(), data, **kwargs)


def test_different_sample_counts_are_named():
    program = fork_program()
    program.inputs.append("x2")
    program.tensors["x2"] = program.tensors["x"]
    with pytest.raises(ProgramError, match=r"different sample counts \[2, 3\]"):
        run_batches(program, {"x": np.zeros((3, 2, 6, 6), np.float32), "x2": np.zeros((2, 2, 6, 6), np.float32)})


def test_a_pickled_layer_leaves_its_prepared_plan_behind():
    program = fork_program()
    program.run(_data(2))
    conv = program.layer("conv1")
    assert "_fast_plan" in conv.__dict__  # prepared by the fast kernels on the first run
    copy = pickle.loads(pickle.dumps(program))
    assert "_fast_plan" not in copy.layer("conv1").__dict__
    np.testing.assert_array_equal(copy.run(_data(2, seed=5), raw=True)["out"], program.run(_data(2, seed=5), raw=True)["out"])
