"""Calibration data a user hands in: an ``.npz`` file (or ``.npy``, or a dict of arrays), checked
against the model's inputs and read back batch by batch.

Layout: one array per model input, keyed by the input's name (a one-input model may use any single
key), with the samples on axis 0. The samples' axis replaces the model's batch axis, which must be
1 or symbolic: a model input of shape (1, 3, 224, 224) takes an array of shape (N, 3, 224, 224).

Nothing is held in memory beyond one batch: an ``.npz`` member is streamed from the zip archive in
sample order (a C-ordered ``.npy`` is a run of equal-sized sample records), a plain ``.npy`` is
memory-mapped, and an in-memory array is sliced. Arrays holding Python objects are refused, never
unpickled (unpickling runs code). Every problem is a ``CompileError`` naming the file and the input.
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Iterator, Mapping, Union

import numpy as np
import onnx

from .errors import CompileError

Dim = Union[int, str, None]  # a static size, or a symbolic one (dim_param name, or None)
InputSpec = tuple[tuple[Dim, ...], np.dtype]

_SCAN_BYTES = 16 << 20  # read size of the validation pass (bounded memory whatever the file size)
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"


def model_input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """``{name: (shape, dtype)}`` of the model's real inputs (initializers listed as inputs are
    skipped); a dimension is its size, its dim_param name, or None if unknown."""
    inits = {i.name for i in model.graph.initializer}
    specs = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs[inp.name] = (tuple(dims), dtype)
    return specs


# --------------------------------------------------------------------------- array sources


class _ArraySource:
    """An array already addressable without reading it all: in memory, or a memory map."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.shape[0], rows):
            yield self.array[start:start + rows]


class _NpzMemberSource:
    """One ``.npy`` member of an ``.npz`` archive, read sequentially ``rows`` samples at a time."""

    def __init__(self, path: str, member: str, shape: tuple[int, ...], dtype: np.dtype,
                 fortran_order: bool):
        self.path, self.member = path, member
        self.shape, self.dtype, self.fortran_order = shape, dtype, fortran_order

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            if self.fortran_order:
                # A Fortran-ordered file does not store samples contiguously: read this one whole.
                array = np.lib.format.read_array(f, allow_pickle=False)  # reads the header too
                yield from _ArraySource(np.ascontiguousarray(array)).chunks(rows)
                return
            _read_npy_header(f)
            sample_shape = self.shape[1:]
            record = self.dtype.itemsize * math.prod(sample_shape)
            for start in range(0, self.shape[0], rows):
                count = min(rows, self.shape[0] - start)
                buf = f.read(record * count)
                if len(buf) != record * count:
                    raise CompileError(f"calibration data '{self.path}': array '{self.member}' "
                                       f"ends early, inside sample {start + len(buf) // record}")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((count,) + sample_shape)


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0 and 3.0 share the layout


def _open_npz(path: str) -> dict[str, _NpzMemberSource]:
    """Read the headers (not the data) of every member of an ``.npz``."""
    where = f"calibration data '{path}'"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CompileError(f"{where}: not a valid .npz file ({e})") from None
    sources = {}
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise CompileError(f"{where}: not a valid .npz file: member '{info.filename}' "
                                   f"is not a .npy array")
            key = info.filename[:-len(".npy")]
            try:
                with zf.open(info) as f:
                    shape, fortran, dtype = _read_npy_header(f)
                    header_bytes = f.tell()
            except (ValueError, OSError, zipfile.BadZipFile, NotImplementedError) as e:
                raise CompileError(
                    f"{where}: array '{key}' is not a valid .npy array ({e})") from None
            if dtype.hasobject:
                raise CompileError(f"{where}: array '{key}' holds Python objects (a pickle); "
                                   f"calibration data must be plain numeric arrays, and pickles "
                                   f"are never loaded (loading one can run code)")
            data_bytes = dtype.itemsize * math.prod(shape)
            if info.file_size < header_bytes + data_bytes:
                raise CompileError(f"{where}: array '{key}' is truncated: its header promises "
                                   f"{data_bytes} bytes of data, the archive holds "
                                   f"{info.file_size - header_bytes}")
            sources[key] = _NpzMemberSource(path, info.filename, tuple(shape), dtype, fortran)
    return sources


def _open_npy(path: str) -> dict[str, _ArraySource]:
    where = f"calibration data '{path}'"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise CompileError(f"{where}: not a valid .npy file, or it holds Python objects "
                           f"(pickles are never loaded): {e}") from None
    return {os.path.splitext(os.path.basename(path))[0]: _ArraySource(array)}


def _open_path(path: str) -> dict:
    if not os.path.isfile(path):
        raise CompileError(f"calibration data '{path}': no such file")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        return _open_npz(path)
    if head == _NPY_MAGIC:
        return _open_npy(path)
    raise CompileError(f"calibration data '{path}': not a valid .npz file (nor .npy): it does not "
                       f"start like a zip archive")


# --------------------------------------------------------------------------- the set


class CalibrationSet:
    """Checked calibration data: ``num_samples`` samples for each model input, read in batches."""

    def __init__(self, sources: dict, dtypes: dict[str, np.dtype], origin: str):
        self._sources = sources
        self._dtypes = dtypes
        self.origin = origin
        self.input_names = list(sources)
        self.num_samples = next(iter(sources.values())).shape[0]

    def sample_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sources[name].shape[1:])

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` samples (the last may be smaller), keyed by input name, in the
        model's dtypes and C-contiguous; only the current batch is in memory."""
        if batch_size < 1:
            raise CompileError(f"batch size must be at least 1, got {batch_size}")
        streams = {name: src.chunks(batch_size) for name, src in self._sources.items()}
        try:
            for _ in range(math.ceil(self.num_samples / batch_size)):
                yield {name: _as_feed(next(it), self._dtypes[name]) for name, it in streams.items()}
        finally:
            for it in streams.values():
                it.close()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {self.sample_shape(n)}" for n in self.input_names)
        return f"CalibrationSet({self.origin}, {self.num_samples} samples, {shapes})"


def _as_feed(chunk: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if chunk.dtype != dtype:
        return chunk.astype(dtype)  # a copy of one batch only
    return np.ascontiguousarray(chunk)


def load_calibration(source: str | os.PathLike | Mapping[str, np.ndarray],
                     input_specs: Mapping[str, InputSpec]) -> CalibrationSet:
    """Open and check calibration data for a model whose inputs are ``input_specs`` (name ->
    (shape with the batch axis first, dtype); see ``model_input_specs``).

    ``source`` is a path to an ``.npz`` (or ``.npy`` for a one-input model), or a dict name ->
    array. Checks: names, per-sample shapes, dtype kinds (a float array is cast to the model's float
    type; an integer array for a float input is refused, since it usually needs normalising),
    finite values, equal sample counts, at least one sample. One pass reads the data to check it.
    """
    if isinstance(source, Mapping):
        origin = "calibration data (dict)"
        sources = {}
        for key, value in source.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.dtype.hasobject:
                raise CompileError(f"{origin}: array '{key}' holds Python objects; calibration "
                                   f"data must be plain numeric arrays")
            sources[str(key)] = _ArraySource(array)
    else:
        path = os.fspath(source)
        origin = f"calibration data '{path}'"
        sources = _open_path(path)
    if not input_specs:
        raise CompileError(f"{origin}: the model has no inputs to calibrate")

    sources = _match_names(sources, input_specs, origin)
    dtypes = {}
    for name, src in sources.items():
        shape, dtype = input_specs[name]
        _check_shape(src, name, tuple(shape), origin)
        dtypes[name] = _check_dtype(src, name, np.dtype(dtype), origin)

    counts = {name: src.shape[0] for name, src in sources.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{n}' has {c}" for n, c in counts.items())
        raise CompileError(f"{origin}: inputs have different numbers of samples: {listed}")
    if next(iter(counts.values())) == 0:
        first = next(iter(counts))
        raise CompileError(f"{origin}: no samples (input '{first}' has 0 along axis 0)")

    for name, src in sources.items():
        _scan_values(src, name, dtypes[name], origin)
    return CalibrationSet(sources, dtypes, origin)


def _match_names(sources: dict, specs: Mapping[str, InputSpec], origin: str) -> dict:
    """Key the arrays by model input, in the model's input order."""
    names = list(specs)
    if len(names) == 1 and len(sources) == 1:
        return {names[0]: next(iter(sources.values()))}  # one unnamed array for a one-input model
    missing = [n for n in names if n not in sources]
    extra = [k for k in sources if k not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no array for model input(s) {_quoted(missing)}")
        if extra:
            parts.append(f"array(s) {_quoted(extra)} match no model input")
        raise CompileError(f"{origin}: {'; '.join(parts)} (model inputs: {_quoted(names)}; "
                           f"arrays: {_quoted(list(sources)) or 'none'})")
    return {n: sources[n] for n in names}


def _check_shape(src, name: str, shape: tuple[Dim, ...], origin: str) -> None:
    where = f"{origin}: input '{name}'"
    if not shape:
        raise CompileError(f"{where}: the model input is a scalar; it has no batch axis for the "
                           f"samples to replace")
    batch = shape[0]
    if isinstance(batch, int) and batch != 1:
        raise CompileError(f"{where}: the model input has a fixed batch size of {batch}; "
                           f"calibration needs batch 1 or a symbolic batch axis")
    if len(src.shape) == 0:
        raise CompileError(f"{where}: got a scalar; expected samples stacked on axis 0")
    expected, got = shape[1:], tuple(src.shape[1:])
    fits = len(expected) == len(got) and all(
        not isinstance(e, int) or e == g for e, g in zip(expected, got))
    if not fits:
        want = tuple("?" if not isinstance(e, int) else e for e in expected)
        raise CompileError(f"{where}: each sample must have shape {want} (the model input's shape "
                           f"{tuple(shape)} with the batch axis replaced by the samples), got "
                           f"{got} per sample (array shape {tuple(src.shape)})")


def _check_dtype(src, name: str, want: np.dtype, origin: str) -> np.dtype:
    have = src.dtype
    ok = {"f": "f", "i": "iu", "u": "iu", "b": "b"}.get(want.kind, "")
    if have.kind not in ok:
        hint = " (convert and normalise it to float first)" if want.kind == "f" else ""
        raise CompileError(f"{origin}: input '{name}': array has dtype {have}, but the model input "
                           f"is {want}{hint}")
    return want


def _scan_values(src, name: str, dtype: np.dtype, origin: str) -> None:
    """One bounded-memory pass over the data: finite values (after the cast to the model's type),
    and integers that fit the model's integer type."""
    where = f"{origin}: input '{name}'"
    record = max(1, src.dtype.itemsize * math.prod(src.shape[1:]))
    rows = max(1, _SCAN_BYTES // record)
    nonfinite, nan, bad_samples, start = 0, 0, [], 0
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    try:
        for chunk in src.chunks(rows):
            if dtype.kind == "f":
                with np.errstate(over="ignore", invalid="ignore"):
                    cast = chunk.astype(dtype, copy=False)
                bad = ~np.isfinite(cast)
                if bad.any():
                    per_sample = bad.reshape(len(chunk), -1).any(axis=1)
                    nonfinite += int(bad.sum())
                    nan += int(np.isnan(cast).sum())
                    bad_samples.extend((start + np.flatnonzero(per_sample)).tolist())
            elif info is not None and chunk.size:
                lo, hi = chunk.min(), chunk.max()
                if lo < info.min or hi > info.max:
                    raise CompileError(f"{where}: values {lo}..{hi} do not fit the model's {dtype}")
            start += len(chunk)
    except zipfile.BadZipFile as e:
        raise CompileError(f"{where}: the archive is damaged ({e})") from None
    if nonfinite:
        shown = ", ".join(map(str, bad_samples[:5])) + (", ..." if len(bad_samples) > 5 else "")
        raise CompileError(f"{where}: {nonfinite} non-finite value(s) ({nan} NaN, "
                           f"{nonfinite - nan} infinite, counted after conversion to {dtype}) in "
                           f"{len(bad_samples)} sample(s): {shown}")


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
