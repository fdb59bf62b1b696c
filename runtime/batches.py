"""Running a program over a whole data set in batches, in this process or in several.

The kernels are single-threaded numpy; BLAS threads help the products only (ResNet-50 139 -> 109
ms per image with two, MobileNetV2 41 -> 39) and threads of our own lost time to the GIL. Worker
processes scale: on a 2-core machine two of them each run as fast as one alone, so a validation
set goes through in about half the time. Each worker receives the program once (pickled without
the layers' prepared plans) and prepares its own plans on its first batch; batches are handed
out in order and the outputs come back in order, so the result is the same array as in one
process, integer for integer.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .errors import ProgramError
from .ir import Program

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_worker_program: Program | None = None


def _start_worker(program: Program) -> None:
    global _worker_program
    _worker_program = program


def _run_in_worker(feeds: dict, raw: bool, keep_float_weights: bool) -> dict:
    return _worker_program.run(feeds, raw=raw, keep_float_weights=keep_float_weights)


def sample_count(data: dict[str, np.ndarray]) -> int:
    """The number of samples (axis 0), the same for every input; ProgramError otherwise."""
    counts = {len(v) for v in data.values()}
    if len(counts) != 1:
        raise ProgramError(f"inputs have different sample counts {sorted(counts)}")
    return counts.pop()


def _batches(data: dict[str, np.ndarray], batch_size: int):
    n = sample_count(data)
    if n == 0:
        raise ProgramError("no samples to run (axis 0 has length 0)")
    for start in range(0, n, batch_size):
        yield {k: np.ascontiguousarray(v[start:start + batch_size]) for k, v in data.items()}


@contextlib.contextmanager
def _one_blas_thread_each():
    """Spawned workers start with one BLAS thread each unless the caller chose a number: N
    processes times N BLAS threads on N cores would only compete."""
    unset = [k for k in BLAS_THREAD_VARIABLES if k not in os.environ]
    os.environ.update(dict.fromkeys(unset, "1"))
    try:
        yield
    finally:
        for k in unset:
            os.environ.pop(k, None)


def run_batches(program: Program, data: dict[str, np.ndarray], *, batch_size: int = 8, jobs: int = 1,
                raw: bool = False, keep_float_weights: bool = True, on_batch=None) -> dict[str, np.ndarray]:
    """Run ``program`` on every sample of ``data`` ({input name: array, samples on axis 0}) in
    batches of ``batch_size``; returns {output name: all samples stacked}. ``jobs`` > 1 runs the
    batches in that many spawned worker processes (a script that calls this at top level needs
    the usual ``if __name__ == "__main__":`` guard). ``on_batch(stats, samples)`` (one process only)
    receives each batch's ``execute`` stats, as ``runtime.profile.Profile.add`` takes them."""
    if batch_size < 1 or jobs < 1:
        raise ProgramError(f"batch size and jobs must be at least 1, got {batch_size} and {jobs}")
    if jobs > 1 and on_batch is not None:
        raise ProgramError("per-batch stats (profiling) are measured in one process: use jobs=1")
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in program.outputs}
    if jobs == 1:
        for feeds in _batches(data, batch_size):
            stats = {} if on_batch is not None else None
            for name, value in program.run(feeds, raw=raw, keep_float_weights=keep_float_weights, stats=stats).items():
                outputs[name].append(value)
            if on_batch is not None:
                on_batch(stats, len(next(iter(feeds.values()))))
    else:
        batches = list(_batches(data, batch_size))
        with _one_blas_thread_each(), ProcessPoolExecutor(
                max_workers=min(jobs, len(batches)), mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(program,)) as pool:
            try:
                results = list(pool.map(_run_in_worker, batches, [raw] * len(batches),
                                        [keep_float_weights] * len(batches)))
            except BrokenProcessPool as exc:
                raise ProgramError(f"a worker process died ({exc}); run with jobs=1 to see why") from None
        for result in results:
            for name, value in result.items():
                outputs[name].append(value)
    return {name: np.concatenate(values) for name, values in outputs.items()}
