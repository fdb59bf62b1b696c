"""Benchmark qlower against onnxruntime: compile time, inference latency and peak memory.

One command, one table, every figure from the same run on the same machine:

    python -m tools.benchmark [--models resnet50,mobilenetv2,efficientnet_lite0] [--samples 32]
                              [--large-samples 512] [--repeats 5] [--threads N]
                              [--parts compile,latency,throughput,memory] [--quick]

Per model (ResNet-50 and MobileNetV2 from ``tools.architectures``; EfficientNet-Lite0 from
``../shared/data/efficientnet_lite0.onnx`` with its ``_calib.npz`` when present, else the builder):

- compile time including calibration and saving the outputs, same model file, same N samples:
  qlower (``compile_model`` + ``CompileResult.save``) vs onnxruntime (``quant_pre_process`` +
  ``quantize_static``, QDQ, per-channel, which saves its model), for MinMax and Percentile
  (99.99 on both sides). Each compile runs in a fresh process;
- inference latency per sample at batch 1 and batch 8 (best of ``--repeats``, wall clock):
  qlower's IR runtime (the compiled ``model.qir``), onnxruntime on the float model and on its own
  QDQ model (default session options: all graph optimizations, so the QDQ model runs int8 kernels),
  once with the libraries' default threads and once with 1 thread on every side (BLAS and
  onnxruntime), the comparison that stays meaningful on a busy machine;
- data-set throughput on all cores, as when measuring accuracy on a validation set: seconds for
  ``--throughput-samples`` samples in batches of 8 through qlower's runtime in one worker process
  per core (``runtime.batches.run_batches``, process start-up and plan preparation included) and
  through onnxruntime's float session with one intra-op thread per core (warmed up);
- peak RSS (VmHWM) of a qlower compile at N and at ``--large-samples`` samples read from
  memory-mapped ``.npy`` files in a folder, each in a fresh process, and of the IR runtime at
  batch 1 beside what it must hold (integer weights, the executor's largest set of live
  activations and, with ``keep_float_weights=True``, the fast kernels' float weight copies),
  with and without those copies, next to onnxruntime's session on the float model.

``--threads N`` sets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS in the child processes and
onnxruntime's intra-op threads for every measurement (latency then only at N threads).
The machine lines (cores, CPU, load average, numpy's BLAS, versions) come first.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_MODELS = ("resnet50", "mobilenetv2", "efficientnet_lite0")
LATENCY_GOALS = {"resnet50": 2.0, "mobilenetv2": 3.0}
METHODS = (("minmax", "MinMax", 0.5), ("percentile", "Percentile", 0.25))
PERCENTILE = 99.99


@dataclass
class Row:
    """One line of the table; ``ratio`` is qlower / onnxruntime (or N=large / N=small)."""

    model: str
    measure: str
    qlower: str
    onnxruntime: str = ""
    ratio: str = ""
    goal: str = ""


# --------------------------------------------------------------------------- processes


def _status_kib(field: str) -> int:
    """A VmXXX field of /proc/self/status in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _run(isolate: bool, fn, *args):
    """fn(*args), in a fresh spawned process when ``isolate`` (so that peak RSS, imports and
    caches of one measurement do not touch another)."""
    if not isolate:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_quietly, fn, *args).result()


def _quietly(fn, *args):
    """fn(*args) with its prints (onnxruntime's calibrator talks) sent to stderr, not the table."""
    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args)


@contextlib.contextmanager
def _threads_env(threads: int | None):
    """BLAS thread variables for the children spawned inside (None: leave them as they are)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    if threads:
        os.environ.update({k: str(threads) for k in names})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ort_session(model, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _dynamic_session(model_path: str, threads: int | None):
    """A session on the model with a symbolic batch dimension, or None when onnxruntime will not
    build one (then batches run sample by sample)."""
    try:
        return _ort_session(_dynamic_batch(model_path), threads)
    except Exception as exc:  # noqa: BLE001 - e.g. a batch baked into a Reshape
        print(f"{model_path}: no symbolic-batch session ({type(exc).__name__}); batches run sample by sample",
              file=sys.stderr)
        return None


def _runs_batch(session, input_name: str, x: np.ndarray) -> bool:
    """Whether ``session`` takes ``x`` as one batch. A probe: failing is expected for models whose
    batch is baked in, so onnxruntime runs it with its logging at fatal."""
    if session is None:
        return False
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    try:
        session.run(None, {input_name: x}, options)
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- jobs (child side)


class _Reader:
    """onnxruntime CalibrationDataReader over an .npz, one sample per call (batch 1)."""

    def __init__(self, path: str):
        with np.load(path) as data:
            self.arrays = {k: data[k] for k in data.files}
        self.n = len(next(iter(self.arrays.values())))
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {k: v[self.i: self.i + 1] for k, v in self.arrays.items()}
        self.i += 1
        return feed

    def rewind(self):
        self.i = 0


def compile_qlower_job(model_path: str, calib_path: str, out_dir: str, method: str, target: str) -> dict:
    """Compile with qlower and save; seconds from the call to the saved files, the report's
    stage times, peak RSS."""
    from compiler.api import compile_model

    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    result = compile_model(model_path, target, calib_path, calib_method=method, percentile=PERCENTILE)
    result.save(out_dir)
    seconds = time.perf_counter() - start
    stages = dict(result.report.stage_seconds)
    return {"seconds": seconds, "stages": stages, "rss0_mb": rss0 / 1024, "peak_mb": _status_kib("VmHWM") / 1024}


def compile_ort_job(model_path: str, calib_path: str, out_path: str, method: str, threads: int | None,
                    preprocess: bool = True) -> dict:
    """quant_pre_process + quantize_static (QDQ, per-channel), the peer's documented flow
    (``preprocess=False`` skips quant_pre_process: the smoke test, which must not import torch)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if preprocess:  # imported lazily by quant_pre_process (with torch, when installed): not timed
        import onnxruntime.tools.symbolic_shape_infer  # noqa: F401

    class Reader(_Reader, CalibrationDataReader):
        pass

    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    extra = {"CalibPercentile": PERCENTILE} if method == "percentile" else {}
    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    pre = str(Path(out_path).with_suffix(".pre.onnx"))
    if preprocess:
        quant_pre_process(model_path, pre)
    else:
        pre = model_path
    quantize_static(pre, out_path, Reader(calib_path), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=calib, extra_options=extra)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss0_mb": rss0 / 1024, "peak_mb": _status_kib("VmHWM") / 1024}


def _dynamic_batch(model_path: str) -> bytes:
    """The model with a symbolic batch dimension on its inputs and outputs (for batch 8)."""
    import onnx

    model = onnx.load(model_path)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "N"
    del model.graph.value_info[:]
    return model.SerializeToString()


def _best_per_sample(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up (fast-kernel plans, onnxruntime's first-run allocations)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / batch


def latency_job(program_path: str, model_path: str, qdq_path: str, samples: np.ndarray, input_name: str,
                batches: tuple[int, ...], repeats: int, threads: int | None) -> dict:
    """Per-sample latency (s) of the IR runtime, onnxruntime float and onnxruntime QDQ per batch.
    onnxruntime runs the batch as one call when the model accepts a symbolic batch, else sample
    by sample (then ``ort_batched`` says False)."""
    import runtime

    program = runtime.load_program(program_path)
    out: dict = {"qlower": {}, "ort_float": {}, "ort_qdq": {}, "ort_batched": {}}
    sessions = {key: (_ort_session(path, threads), _dynamic_session(path, threads))
                for key, path in (("ort_float", model_path), ("ort_qdq", qdq_path))}
    for batch in batches:
        x = np.ascontiguousarray(samples[:batch])
        out["qlower"][batch] = _best_per_sample(lambda x=x: program.run({input_name: x}), batch, repeats)
        for key, (static, dynamic) in sessions.items():
            batched = batch > 1 and _runs_batch(dynamic, input_name, x)
            if batch == 1 or batched:
                def fn(s=static if batch == 1 else dynamic, x=x):
                    return s.run(None, {input_name: x})
            else:
                def fn(s=static, x=x):
                    return [s.run(None, {input_name: x[i:i + 1]}) for i in range(len(x))]
            out[key][batch] = _best_per_sample(fn, batch, repeats)
            out["ort_batched"][(key, batch)] = batched or batch == 1
    return out


def throughput_job(program_path: str, model_path: str, samples: np.ndarray, input_name: str, jobs: int,
                   batch: int) -> dict:
    """Seconds for ``samples`` in batches of ``batch``: qlower's runtime in ``jobs`` worker
    processes (start-up included), onnxruntime's float session with ``jobs`` intra-op threads
    (a warm-up batch first; sample by sample when the batch is baked into the model)."""
    import runtime
    from runtime.batches import run_batches

    program = runtime.load_program(program_path)
    start = time.perf_counter()
    run_batches(program, {input_name: samples}, batch_size=batch, jobs=jobs)
    qlower = time.perf_counter() - start
    session, step = _dynamic_session(model_path, jobs), batch
    if not _runs_batch(session, input_name, np.ascontiguousarray(samples[:batch])):  # also the warm-up
        session, step = _ort_session(model_path, jobs), 1
        session.run(None, {input_name: samples[:1]})
    start = time.perf_counter()
    for i in range(0, len(samples), step):
        session.run(None, {input_name: np.ascontiguousarray(samples[i:i + step])})
    return {"qlower": qlower, "ort": time.perf_counter() - start, "ort_batched": step == batch}


def calibration_memory_job(model_path: str, data_path: str, target: str) -> dict:
    """Peak RSS of a whole qlower compile whose calibration data is ``data_path`` (a folder of
    .npy files, or one memory-mapped .npy), beside the RSS after imports."""
    from compiler.api import compile_model

    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    compile_model(model_path, target, data_path)
    return {"seconds": time.perf_counter() - start, "rss0_mb": rss0 / 1024, "peak_mb": _status_kib("VmHWM") / 1024}


def runtime_memory_job(program_path: str, sample: np.ndarray, input_name: str, keep_float_weights: bool = True) -> dict:
    """Peak RSS of loading and running the program on one sample (twice: the second run reuses
    the prepared plans), beside what it must hold."""
    import runtime

    rss0 = _status_kib("VmRSS")
    program = runtime.load_program(program_path)
    rss_loaded = _status_kib("VmRSS")
    stats: dict = {}
    for _ in range(2):
        runtime.execute(program, {input_name: sample}, stats=stats, keep_float_weights=keep_float_weights)
    weights = sum(np.asarray(v).nbytes for layer in program.layers for v in layer.params.values())
    prepared = 0
    for layer in program.layers:
        plan = layer.__dict__.get("_fast_plan")
        for group in getattr(plan, "wmats", None) or []:
            prepared += sum(a.nbytes for a in group)
        prepared += sum(a.nbytes for a in getattr(plan, "wts", None) or [])
    return {"rss0_mb": rss0 / 1024, "loaded_mb": rss_loaded / 1024, "peak_mb": _status_kib("VmHWM") / 1024,
                "weights_mb": weights / 2**20, "prepared_mb": prepared / 2**20,
                "live_mb": stats.get("peak_live_bytes", 0) / 2**20}


def ort_memory_job(model_path: str, sample: np.ndarray, input_name: str, threads: int | None) -> dict:
    """Peak RSS of an onnxruntime session on the float model running one sample twice."""
    import onnxruntime  # noqa: F401  (imported before the first RSS reading, as the runtime's numpy)

    rss0 = _status_kib("VmRSS")
    session = _ort_session(model_path, threads)
    for _ in range(2):
        session.run(None, {input_name: sample})
    return {"rss0_mb": rss0 / 1024, "peak_mb": _status_kib("VmHWM") / 1024}


# --------------------------------------------------------------------------- parent side


@dataclass
class Options:
    samples: int = 32
    large_samples: int = 512
    repeats: int = 5
    batches: tuple[int, ...] = (1, 8)
    throughput_samples: int = 128
    threads: int | None = None
    target: str = "mmav2"
    isolate: bool = True
    methods: tuple = METHODS
    ort_preprocess: bool = True
    latency_threads: tuple = (None, 1)  # None: the environment's / libraries' default
    parts: tuple = ("compile", "latency", "throughput", "memory")


def prepare_model(name: str, work: Path, n: int) -> tuple[Path, Path, str, str]:
    """Write the model and an .npz of ``n`` calibration samples into ``work``; returns (model
    path, npz path, input name, where the model came from)."""
    from tools.model_zoo import calibration_samples, save_model, save_npz

    model_path, npz_path = work / f"{name}.onnx", work / f"{name}_calib.npz"
    shared = SHARED_DATA / f"{name}.onnx"
    if shared.exists() and (SHARED_DATA / f"{name}_calib.npz").exists():
        model_path.write_bytes(shared.read_bytes())
        with np.load(SHARED_DATA / f"{name}_calib.npz") as data:
            arrays = {k: data[k] for k in data.files}
        reps = -(-n // len(next(iter(arrays.values()))))
        arrays = {k: np.concatenate([v] * reps)[:n] for k, v in arrays.items()}
        source = f"{shared} (+ _calib.npz)"
    else:
        from tools.architectures import ARCHITECTURES
        from tools.model_zoo import MODELS

        builders = dict(MODELS, **ARCHITECTURES)
        model = builders[name]()
        save_model(model, model_path)
        arrays = calibration_samples(model, n, seed=1)
        source = "tools.architectures" if name in ARCHITECTURES else "tools.model_zoo"
    save_npz(npz_path, arrays)
    (input_name,) = list(arrays)
    return model_path, npz_path, input_name, source


def write_npy_folder(folder: Path, model_path: Path, n: int) -> Path:
    """``n`` image-like samples as ``folder/<input>.npy`` (read back memory-mapped)."""
    import onnx

    from tools.model_zoo import calibration_samples

    folder.mkdir(parents=True, exist_ok=True)
    arrays = calibration_samples(onnx.load(str(model_path), load_external_data=False), n, seed=3)
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", value)
    return folder


def _calibration_source(folder: Path, isolate: bool, model_path: Path, target: str) -> tuple[str, str]:
    """The folder itself when compile_model accepts a folder of .npy files, else the lone .npy
    (memory-mapped by load_calibration); returns (path, note)."""
    from compiler.errors import CompileError

    files = sorted(folder.glob("*.npy"))
    try:
        from compiler.calibration_data import load_calibration
        from compiler.loader import load_model

        load_calibration(str(folder), load_model(str(model_path)).inputs)
        return str(folder), "folder of .npy"
    except (CompileError, TypeError, ValueError, OSError):
        if len(files) != 1:
            raise
        return str(files[0]), "one memory-mapped .npy (no folder support in load_calibration yet)"


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def benchmark_model(name: str, opts: Options, work: Path, log=print) -> list[Row]:
    """Every measurement of one model; returns its rows."""
    rows: list[Row] = []
    model_path, npz_path, input_name, source = prepare_model(name, work, opts.samples)
    log(f"[{name}] model from {source}; {opts.samples} calibration samples")
    qdq_paths = {}
    for method, label, goal in opts.methods if "compile" in opts.parts else opts.methods[:1]:
        out_dir = work / f"{name}_{method}"
        q = _run(opts.isolate, compile_qlower_job, str(model_path), str(npz_path), str(out_dir), method, opts.target)
        ort_out = work / f"{name}_{method}.ort_qdq.onnx"
        o = _run(opts.isolate, compile_ort_job, str(model_path), str(npz_path), str(ort_out), method, opts.threads,
                 opts.ort_preprocess)
        qdq_paths[method] = (out_dir / "model.qir", ort_out)
        log(f"[{name}] compile {label}: qlower {q['seconds']:.2f} s, onnxruntime {o['seconds']:.2f} s")
        if "compile" not in opts.parts:
            continue
        rows.append(Row(name, f"compile {label}, N={opts.samples} (s)", _fmt(q["seconds"]), _fmt(o["seconds"]),
                        _fmt(q["seconds"] / o["seconds"]), f"<= {goal}"))
        rows.append(Row(name, "  of which qlower's calibration stage (s)", _fmt(q["stages"].get("calibration", 0.0))))
        rows.append(Row(name, f"compile {label} peak RSS (MB)", _fmt(q["peak_mb"], 0), _fmt(o["peak_mb"], 0),
                        _fmt(q["peak_mb"] / o["peak_mb"])))

    program_path, ort_qdq = qdq_paths["minmax"] if "minmax" in qdq_paths else next(iter(qdq_paths.values()))
    with np.load(npz_path) as data:
        samples = data[input_name]
    batches = tuple(b for b in opts.batches if b <= len(samples)) or (1,)
    goal = LATENCY_GOALS.get(name)
    for threads in opts.latency_threads if "latency" in opts.parts else ():
        with _threads_env(threads):
            lat = _run(opts.isolate, latency_job, str(program_path), str(model_path), str(ort_qdq), samples,
                       input_name, batches, opts.repeats, threads)
        how = f"{threads} thread{'s' if threads > 1 else ''}" if threads else "default threads"
        for batch in batches:
            ql, fl, qd = lat["qlower"][batch] * 1e3, lat["ort_float"][batch] * 1e3, lat["ort_qdq"][batch] * 1e3
            note = "" if lat["ort_batched"][("ort_float", batch)] else ", ORT sample by sample"
            log(f"[{name}] batch {batch}, {how}: qlower {ql:.1f} ms, ORT float {fl:.1f} ms, "
                f"ORT QDQ {qd:.1f} ms per sample")
            rows.append(Row(name, f"latency batch {batch}, {how}, vs ORT float (ms/sample){note}", _fmt(ql, 1),
                            _fmt(fl, 1), _fmt(ql / fl), f"<= {goal}" if goal else ""))
            rows.append(Row(name, f"latency batch {batch}, {how}, vs ORT QDQ (ms/sample)", _fmt(ql, 1), _fmt(qd, 1),
                            _fmt(ql / qd)))

    if "throughput" in opts.parts:
        cores, batch = os.cpu_count() or 1, max(opts.batches)
        data = np.concatenate([samples] * -(-opts.throughput_samples // len(samples)))[:opts.throughput_samples]
        t = _run(opts.isolate, throughput_job, str(program_path), str(model_path), data, input_name, cores, batch)
        note = "" if t["ort_batched"] else ", ORT sample by sample"
        log(f"[{name}] {len(data)} samples on {cores} cores: qlower {t['qlower']:.2f} s, ORT float {t['ort']:.2f} s")
        rows.append(Row(name, f"{len(data)} samples, batch {batch}, {cores} cores: {cores} processes (with start-up) "
                              f"vs ORT float {cores} threads (s){note}",
                        _fmt(t["qlower"]), _fmt(t["ort"]), _fmt(t["qlower"] / t["ort"])))

    if "memory" in opts.parts:
        peaks = {}
        for n in (opts.samples, opts.large_samples):
            folder = write_npy_folder(work / f"{name}_npy_{n}", model_path, n)
            path, how = _calibration_source(folder, opts.isolate, model_path, opts.target)
            peaks[n] = _run(opts.isolate, calibration_memory_job, str(model_path), path, opts.target)
            log(f"[{name}] compile peak RSS, N={n} ({how}): {peaks[n]['peak_mb']:.0f} MB")
            for f in folder.glob("*.npy"):
                f.unlink()
        small, large = peaks[opts.samples]["peak_mb"], peaks[opts.large_samples]["peak_mb"]
        base = peaks[opts.samples]["rss0_mb"]
        rows.append(Row(name, f"compile peak RSS N={opts.samples} / N={opts.large_samples} (MB; {how})",
                        f"{small:.0f} / {large:.0f}", "", _fmt(large / small), "<= 1.10"))
        rows.append(Row(name, "  of which above the RSS after imports (MB)",
                        f"{small - base:.0f} / {large - peaks[opts.large_samples]['rss0_mb']:.0f}"))
        sample = np.ascontiguousarray(samples[:1])
        ort_mem = _run(opts.isolate, ort_memory_job, str(model_path), sample, input_name, opts.threads)
        ort_peak = ort_mem["peak_mb"] - ort_mem["rss0_mb"]
        for keep in (True, False):
            mem = _run(opts.isolate, runtime_memory_job, str(program_path), sample, input_name, keep)
            floats = f" + float weights {mem['prepared_mb']:.0f}" if keep else ""
            need = mem["weights_mb"] + mem["prepared_mb"] + mem["live_mb"]
            rows.append(Row(name, f"runtime peak RSS batch 1, keep_float_weights={keep}, above imports (MB)",
                            _fmt(mem["peak_mb"] - mem["rss0_mb"], 0), _fmt(ort_peak, 0), "",
                            f"~ {need:.0f} = weights {mem['weights_mb']:.0f}{floats} + live {mem['live_mb']:.1f}"))
    return rows


def machine_lines(threads: int | None) -> list[str]:
    """Cores, CPU, numpy's BLAS, library versions."""
    import onnx
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = "unknown"
    try:
        cfg = np.show_config(mode="dicts")
        info = cfg.get("Build Dependencies", {}).get("blas", {})
        blas = f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception as exc:  # noqa: BLE001 - older numpy without mode="dicts"
        blas = f"unknown ({type(exc).__name__})"
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    return [
        f"machine: {os.cpu_count()} cores ({cpu}); load average {load}; threads: {threads or 'library default'}",
        (f"numpy {np.__version__} (BLAS: {blas}), onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"python {platform.python_version()}"),
    ]


def format_table(rows: list[Row]) -> str:
    """A plain aligned text table."""
    header = Row("model", "measure", "qlower", "onnxruntime", "ratio", "goal")
    cells = [[r.model, r.measure, r.qlower, r.onnxruntime, r.ratio, r.goal] for r in [header] + rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header.__dict__))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples N (default 32)")
    parser.add_argument("--large-samples", type=int, default=512, help="N for the memory comparison (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats, best taken (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS / onnxruntime threads (default: all)")
    parser.add_argument("--throughput-samples", type=int, default=128,
                        help="data-set size for the all-cores throughput rows (default 128)")
    parser.add_argument("--parts", default="compile,latency,throughput,memory",
                        help="what to measure (default: %(default)s; latency needs a MinMax compile, always run)")
    parser.add_argument("--quick", action="store_true",
                        help="MobileNetV2 only unless --models, 8 samples, 64 for memory, 2 repeats")
    args = parser.parse_args(argv)
    opts = Options(samples=args.samples, large_samples=args.large_samples, repeats=args.repeats, threads=args.threads,
                   throughput_samples=args.throughput_samples, parts=tuple(p for p in args.parts.split(",") if p))
    if args.threads:
        opts.latency_threads = (args.threads,)
    models = [m for m in args.models.split(",") if m]
    if args.quick:
        if "--models" not in " ".join(argv if argv is not None else sys.argv):
            models = ["mobilenetv2"]
        opts.samples, opts.large_samples, opts.repeats = min(opts.samples, 8), min(opts.large_samples, 64), 2
        opts.throughput_samples = min(opts.throughput_samples, 32)
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # inherited by the spawned children
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="qlower-bench-") as tmp:
        for name in models:
            rows.extend(benchmark_model(name, opts, Path(tmp), log=lambda s: print(s, file=sys.stderr, flush=True)))
    print("\n".join(machine_lines(opts.threads)))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
