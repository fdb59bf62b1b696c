"""Calibration data a user hands in, checked against the model's inputs and read back batch by
batch: an ``.npz`` file (or ``.npy``), a folder of ``.npy``/``.npz`` files or of images
(``ImageFolder`` states the preprocessing), a dict of arrays, or an iterable of dicts from Python
(``IterableCalibrationSet``).

Layout: one array per model input, keyed by the input's name (a one-input model may use any single
key), with the samples on axis 0. The samples' axis replaces the model's batch axis, which must be
1 or symbolic: a model input of shape (1, 3, 224, 224) takes an array of shape (N, 3, 224, 224).

Nothing is held in memory beyond one batch: an ``.npz`` member is streamed from the zip archive in
sample order (a C-ordered ``.npy`` is a run of equal-sized sample records), a ``.npy`` file is
memory-mapped one batch at a time (each map released after its batch, so the pages read do not
accumulate: N = 512 samples cost the memory of N = 32), images are decoded per batch, and an
in-memory array is sliced. Arrays holding Python objects are refused, never unpickled (unpickling
runs code). Every problem is a ``CompileError`` naming the file (or item) and the input.
"""
from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import CompileError

Dim = int | str | None  # a static size, or a symbolic one (dim_param name, or None)
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


class _NpyFileSource:
    """A stacked ``.npy`` file (samples on axis 0), memory-mapped one chunk at a time: each chunk
    maps only its own samples' bytes and the map is released when the chunk is dropped, so the
    pages read stay out of the process's memory (a single map of the whole file would keep every
    page it has touched resident, and N = 512 would cost 16 times N = 32)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, fortran_order: bool,
                 offset: int):
        self.path, self.shape, self.dtype = path, shape, dtype
        self.fortran_order, self.offset = fortran_order, offset

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        if self.fortran_order or not self.shape:
            # Samples are not contiguous in a Fortran-ordered file: read it whole, once.
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            yield from _ArraySource(np.ascontiguousarray(array)).chunks(rows)
            return
        sample_shape = self.shape[1:]
        record = self.dtype.itemsize * math.prod(sample_shape)
        for start in range(0, self.shape[0], rows):
            count = min(rows, self.shape[0] - start)
            if record == 0:
                yield np.empty((count,) + sample_shape, self.dtype)
                continue
            yield np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * record,
                            shape=(count,) + sample_shape)


def _npy_header(path: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a ``.npy`` file, read without its data."""
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _read_npy_header(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise CompileError(f"{where}: not a valid .npy file ({e})") from None
    if dtype.hasobject:
        raise CompileError(f"{where}: holds Python objects (a pickle); calibration data must be "
                           f"plain numeric arrays, and pickles are never loaded (loading one can "
                           f"run code)")
    need = offset + dtype.itemsize * math.prod(shape)
    size = os.path.getsize(path)
    if size < need:
        raise CompileError(f"{where}: truncated: its header promises {need - offset} bytes of data, "
                           f"the file holds {size - offset}")
    return tuple(shape), fortran, dtype, offset


def _open_npy(path: str) -> dict[str, _NpyFileSource]:
    shape, fortran, dtype, offset = _npy_header(path, f"calibration data '{path}'")
    key = os.path.splitext(os.path.basename(path))[0]
    return {key: _NpyFileSource(path, shape, dtype, fortran, offset)}


class _SampleFilesSource:
    """One input's samples spread over files, one sample per file (``.npy`` holding the sample,
    with or without a leading axis of 1, or one array of a per-sample ``.npz``); each chunk
    memory-maps (or streams) its files, copies them into one batch, and lets the maps go."""

    def __init__(self, files: list[str], key: str | None, sample_shape: tuple[int, ...],
                 dtype: np.dtype):
        self.files, self.key = files, key
        self.shape = (len(files),) + tuple(sample_shape)
        self.dtype = dtype

    def _read(self, path: str) -> np.ndarray:
        if self.key is None:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            return archive[self.key]

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), rows):
            names = self.files[start:start + rows]
            batch = np.empty((len(names),) + self.shape[1:], self.dtype)
            for k, path in enumerate(names):
                try:
                    batch[k] = self._read(path).reshape(self.shape[1:])
                except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
                    raise CompileError(f"calibration data '{path}': cannot be read ({e})") from None
            yield batch


def _open_path(path: str, specs: Mapping[str, InputSpec]) -> dict:
    if os.path.isdir(path):
        return _open_folder(path, specs)
    if not os.path.isfile(path):
        raise CompileError(f"calibration data '{path}': no such file or folder")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        return _open_npz(path)
    if head == _NPY_MAGIC:
        return _open_npy(path)
    raise CompileError(f"calibration data '{path}': not a valid .npz file (nor .npy): it does not "
                       f"start like a zip archive")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


def _open_folder(path: str, specs: Mapping[str, InputSpec]) -> dict:
    """A folder holds, by what is in it:
    - ``<input>.npy`` for every model input: stacked samples, as an unzipped ``.npz``;
    - ``*.npy``, one sample each (one-input model), or ``*.npz``, one sample each with one array
      per input; files are taken in name order;
    - images (``IMAGE_EXTENSIONS``): see ``ImageFolder`` (default preprocessing here).
    Other files (a README, hidden files) are ignored."""
    where = f"calibration data '{path}'"
    entries = sorted(e for e in os.listdir(path)
                     if not e.startswith(".") and os.path.isfile(os.path.join(path, e)))
    npy = [e for e in entries if e.endswith(".npy")]
    npz = [e for e in entries if e.endswith(".npz")]
    images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
    names = list(specs)
    if names and all(f"{n}.npy" in npy for n in names) and len(npy) == len(names):
        return {n: _open_npy(os.path.join(path, f"{n}.npy"))[n] for n in names}
    kinds = [k for k, files in (("'.npy'", npy), ("'.npz'", npz), ("image", images)) if files]
    if len(kinds) > 1:
        raise CompileError(f"{where}: mixes {' and '.join(kinds)} files; put one kind of "
                           f"calibration file in the folder")
    if images:
        return ImageFolder(path)._sources(specs)
    files = [os.path.join(path, e) for e in (npy or npz)]
    if not files:
        raise CompileError(f"{where}: the folder holds no .npy, .npz or image files")
    if npy:
        if len(names) != 1:
            raise CompileError(f"{where}: one-sample .npy files feed a one-input model; this model "
                               f"has inputs {_quoted(names)}: give one .npz per sample (one array "
                               f"per input) or {', '.join(n + '.npy' for n in names)}")
        return {names[0]: _sample_files(files, None, specs[names[0]], where, names[0])}
    keys = list(_open_npz(files[0]))
    if len(names) == 1 and len(keys) == 1:
        keys_for = {names[0]: keys[0]}
    else:
        _match_names(dict.fromkeys(keys), specs, f"calibration data '{files[0]}'")
        keys_for = {n: n for n in names}
    return {n: _sample_files(files, keys_for[n], specs[n], where) for n in names}


def _sample_files(files: list[str], key: str | None, spec: InputSpec, where: str,
                  _input_name: str = "input") -> _SampleFilesSource:
    """Check every file's header (shape and dtype, no data read) and make the source."""
    shape = tuple(spec[0])
    first = None
    for path in files:
        if key is None:
            got_shape, _, dtype, _ = _npy_header(path, f"calibration data '{path}'")
        else:
            member = _open_npz(path).get(key)
            if member is None:
                raise CompileError(f"calibration data '{path}': no array '{key}' (every sample "
                                   f"file needs one array per model input)")
            got_shape, dtype = member.shape, member.dtype
        sample = got_shape[1:] if len(got_shape) == len(shape) and got_shape[:1] == (1,) else got_shape
        if len(sample) != len(shape) - 1 or any(
                isinstance(e, int) and e != g for e, g in zip(shape[1:], sample)):
            want = tuple(e if isinstance(e, int) else "?" for e in shape[1:])
            hint = "" if key is not None else (f"; a stacked array of samples goes in a file "
                                                f"named after the input, e.g. '{_input_name}.npy'")
            raise CompileError(f"calibration data '{path}': one sample must have shape {want} "
                               f"(or {(1,) + want}), got {tuple(got_shape)}{hint}")
        if first is None:
            first, common = tuple(sample), dtype
        elif tuple(sample) != first:
            raise CompileError(f"calibration data '{path}': shape {tuple(sample)} differs from "
                               f"'{files[0]}' ({first}); samples must agree")
        else:
            common = np.result_type(common, dtype)
    return _SampleFilesSource(files, key, first, common)


@dataclass(frozen=True)
class ImageFolder:
    """A folder of images and the preprocessing that turns them into a model input, as TIDL's
    ``input_mean`` / ``input_scale`` state it: each image is decoded with Pillow, converted to RGB
    (grayscale for a one-channel input), resized to ``size`` (H, W; default: the model input's),
    put in ``channel_order``, then x = (pixel - mean[c]) / std[c] with pixels in 0..255 (TIDL's
    input_scale is 1 / std), and laid out as ``layout`` (default: NCHW when the model input's
    axis 1 has 1 or 3 channels, else NHWC). ``resize``: "stretch" (to exactly H x W) or "crop"
    (shorter side to fit, then the centre H x W). Files are taken in name order; an image that
    cannot be decoded is an error naming it."""

    path: str
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    size: tuple[int, int] | None = None
    layout: str | None = None
    channel_order: str = "rgb"
    resize: str = "stretch"

    def describe(self) -> str:
        return (f"images '{self.path}' (mean {list(self.mean)}, std {list(self.std)}, "
                f"order {self.channel_order}, resize {self.resize})")

    def _sources(self, specs: Mapping[str, InputSpec]) -> dict:
        where = f"calibration data '{self.path}'"
        if not os.path.isdir(self.path):
            raise CompileError(f"{where}: no such folder")
        if len(specs) != 1:
            raise CompileError(f"{where}: a folder of images feeds a one-input model; this model "
                               f"has inputs {_quoted(list(specs))}")
        name, (shape, dtype) = next(iter(specs.items()))
        if np.dtype(dtype).kind != "f":
            raise CompileError(f"{where}: model input '{name}' is {np.dtype(dtype)}, images feed "
                               f"a float input")
        if len(shape) != 4:
            raise CompileError(f"{where}: model input '{name}' has shape {tuple(shape)}; images "
                               f"feed a 4-D input (NCHW or NHWC)")
        layout = (self.layout or ("NCHW" if shape[1] in (1, 3) or shape[3] not in (1, 3)
                                  else "NHWC")).upper()
        if layout not in ("NCHW", "NHWC"):
            raise CompileError(f"{where}: layout must be NCHW or NHWC, got '{self.layout}'")
        channels = shape[1] if layout == "NCHW" else shape[3]
        spatial = tuple(shape[2:4]) if layout == "NCHW" else tuple(shape[1:3])
        if channels not in (1, 3):
            raise CompileError(f"{where}: model input '{name}' has {channels} channels in "
                               f"{layout}; images give 1 (grayscale) or 3 (RGB)")
        size = tuple(self.size) if self.size is not None else spatial
        if not all(isinstance(d, int) and d > 0 for d in size) or len(size) != 2:
            raise CompileError(f"{where}: the model input's height and width are {spatial}; give "
                               f"the image size (--size HxW)")
        if any(isinstance(m, int) and m != d for m, d in zip(spatial, size)):
            raise CompileError(f"{where}: --size {size[0]}x{size[1]} does not match model input "
                               f"'{name}' of shape {tuple(shape)} ({layout})")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels) or not all(math.isfinite(v) for v in values):
                raise CompileError(f"{where}: {label} needs 1 or {channels} finite values, got "
                                   f"{list(values)}")
        if any(v == 0 for v in self.std):
            raise CompileError(f"{where}: std must not be 0")
        if self.channel_order not in ("rgb", "bgr"):
            raise CompileError(f"{where}: channel order must be rgb or bgr, got "
                               f"'{self.channel_order}'")
        if self.resize not in ("stretch", "crop"):
            raise CompileError(f"{where}: resize must be stretch or crop, got '{self.resize}'")
        files = sorted(os.path.join(self.path, e) for e in os.listdir(self.path)
                       if e.lower().endswith(IMAGE_EXTENSIONS) and not e.startswith("."))
        if not files:
            raise CompileError(f"{where}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise CompileError(f"{where}: reading images needs Pillow (pip install Pillow)") from None
        return {name: _ImageSource(files, self, layout, channels, size, np.dtype(dtype))}


class _ImageSource:
    """Decodes and preprocesses ``ImageFolder`` images a chunk at a time."""

    def __init__(self, files: list[str], spec: ImageFolder, layout: str, channels: int,
                 size: tuple[int, int], dtype: np.dtype):
        self.files, self.spec, self.layout, self.channels = files, spec, layout, channels
        self.size, self.dtype = size, dtype
        h, w = size
        self.shape = (len(files),) + ((channels, h, w) if layout == "NCHW" else (h, w, channels))
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)

    def _image(self, path: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        h, w = self.size
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if self.spec.resize == "crop":
                    ratio = max(h / im.height, w / im.width)
                    im = im.resize((max(w, round(im.width * ratio)), max(h, round(im.height * ratio))),
                                   Image.BILINEAR)
                    left, top = (im.width - w) // 2, (im.height - h) // 2
                    im = im.crop((left, top, left + w, top + h))
                elif im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                pixels = np.asarray(im, dtype=np.float32).reshape(h, w, self.channels)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise CompileError(f"calibration image '{path}': cannot be decoded ({e})") from None
        if self.spec.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        pixels = (pixels - self.mean) / self.std
        return pixels.transpose(2, 0, 1) if self.layout == "NCHW" else pixels

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), rows):
            names = self.files[start:start + rows]
            batch = np.empty((len(names),) + self.shape[1:], self.dtype)
            for k, path in enumerate(names):
                batch[k] = self._image(path)
            yield batch


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


def load_calibration(source, input_specs: Mapping[str, InputSpec]) -> CalibrationSet:
    """Open and check calibration data for a model whose inputs are ``input_specs`` (name ->
    (shape with the batch axis first, dtype); see ``model_input_specs``).

    ``source``: a path to an ``.npz`` (or ``.npy`` for a one-input model); a folder (see
    ``_open_folder``: ``<input>.npy`` files, one ``.npy``/``.npz`` per sample, or images); an
    ``ImageFolder``; a dict name -> array (a bare array for a one-input model); or an iterable of such dicts (``IterableCalibrationSet``,
    checked as it is read). Checks: names, per-sample shapes, dtype kinds (a float array is cast
    to the model's float type; an integer array for a float input is refused, since it usually
    needs normalising), finite values, equal sample counts, at least one sample. One bounded-memory
    pass reads stored data to check it (images are checked as they are decoded).
    """
    if not input_specs:
        raise CompileError("calibration data: the model has no inputs to calibrate")
    scan = True
    if isinstance(source, ImageFolder):
        origin = f"calibration data {source.describe()}"
        sources = source._sources(input_specs)
        scan = False
    elif isinstance(source, np.ndarray):
        if len(input_specs) != 1:
            raise CompileError(f"calibration data: a bare array fits a one-input model; this model has "
                               f"inputs {sorted(input_specs)}: pass a dict name -> array")
        return load_calibration({next(iter(input_specs)): source}, input_specs)
    elif isinstance(source, Mapping):
        origin = "calibration data (dict)"
        sources = {}
        for key, value in source.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.dtype.hasobject:
                raise CompileError(f"{origin}: array '{key}' holds Python objects; calibration "
                                   f"data must be plain numeric arrays")
            sources[str(key)] = _ArraySource(array)
    elif isinstance(source, (str, bytes, os.PathLike)):
        path = os.fsdecode(source)
        origin = f"calibration data '{path}'"
        sources = _open_path(path, input_specs)
        scan = not any(isinstance(src, _ImageSource) for src in sources.values())
    elif isinstance(source, Iterable):
        return IterableCalibrationSet(source, input_specs)
    else:
        raise CompileError(f"calibration data: expected a path, a folder, a dict of arrays or an "
                           f"iterable of dicts, got {type(source).__name__}")

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

    if scan:
        for name, src in sources.items():
            _scan_values(src, name, dtypes[name], origin)
    return CalibrationSet(sources, dtypes, origin)


class IterableCalibrationSet(CalibrationSet):
    """Calibration data from Python: an iterable of dicts input name -> array, each array one
    sample (the model input's shape without the batch axis) or several stacked on axis 0. Checked
    as it is read (names, shapes, dtype kinds, finite values; an error names the item), re-cut
    into batches of any size; nothing is kept beyond one batch. A list (or any iterable whose
    ``iter()`` starts afresh) can be read as often as needed; a one-shot iterator (a generator)
    only once, and reading it again is an error that says so. ``num_samples`` is None until a
    pass has ended (unless the iterable has a length and every item is one sample)."""

    def __init__(self, iterable: Iterable, specs: Mapping[str, InputSpec]):
        self._iterable = iterable
        self._one_shot = iter(iterable) is iterable
        self._read_once = False
        self._specs = {n: (tuple(shape), np.dtype(dtype)) for n, (shape, dtype) in specs.items()}
        self._dtypes = {n: dtype for n, (_, dtype) in self._specs.items()}
        self.origin = "calibration data (iterable of dicts)"
        self.input_names = list(specs)
        self.num_samples = None

    def sample_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._specs[name][0][1:])

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        if batch_size < 1:
            raise CompileError(f"batch size must be at least 1, got {batch_size}")
        if self._one_shot and self._read_once:
            raise CompileError(f"{self.origin}: a one-shot iterator (e.g. a generator) was read "
                               f"already and this step reads the data again; pass a list, or an "
                               f"object whose iter() starts afresh")
        self._read_once = True
        pending: dict[str, list[np.ndarray]] = {n: [] for n in self.input_names}
        held, total = 0, 0
        for k, item in enumerate(self._iterable):
            arrays = self._checked_item(k, item)
            for n in self.input_names:
                pending[n].append(arrays[n])
            held += len(arrays[self.input_names[0]])
            while held >= batch_size:
                batch = {n: np.concatenate(pending[n]) for n in self.input_names}
                yield {n: np.ascontiguousarray(v[:batch_size]) for n, v in batch.items()}
                total += batch_size
                held -= batch_size
                pending = {n: [v[batch_size:]] if held else [] for n, v in batch.items()}
        if held:
            yield {n: np.ascontiguousarray(np.concatenate(pending[n])) for n in self.input_names}
            total += held
        if total == 0:
            raise CompileError(f"{self.origin}: no samples (the iterable is empty)")
        self.num_samples = total

    def _checked_item(self, k: int, item) -> dict[str, np.ndarray]:
        where = f"{self.origin}: item {k}"
        if not isinstance(item, Mapping):
            raise CompileError(f"{where} is a {type(item).__name__}, not a dict input name -> array")
        if len(self.input_names) == 1 and len(item) == 1:
            item = {self.input_names[0]: next(iter(item.values()))}
        missing = [n for n in self.input_names if n not in item]
        extra = [str(key) for key in item if key not in self._specs]
        if missing or extra:
            raise CompileError(f"{where}: " + "; ".join(
                part for part in (f"no array for model input(s) {_quoted(missing)}" if missing else "",
                                  f"key(s) {_quoted(extra)} match no model input" if extra else "")
                if part))
        arrays, counts = {}, set()
        for name in self.input_names:
            shape, dtype = self._specs[name]
            array = np.asarray(item[name])
            if array.dtype.hasobject:
                raise CompileError(f"{where}: input '{name}' holds Python objects")
            if array.ndim == len(shape) - 1:
                array = array[None]
            _check_shape(_ArraySource(array), name, shape, where)
            _check_dtype(_ArraySource(array), name, dtype, where)
            array = array.astype(dtype, copy=False)
            if dtype.kind == "f" and not np.all(np.isfinite(array)):
                bad = int(np.count_nonzero(~np.isfinite(array)))
                raise CompileError(f"{where}: input '{name}' has {bad} non-finite value(s)")
            arrays[name] = array
            counts.add(len(array))
        if len(counts) > 1:
            raise CompileError(f"{where}: inputs have different numbers of samples "
                               f"{sorted(counts)}")
        return arrays

    def __repr__(self) -> str:
        return f"IterableCalibrationSet({self.num_samples} samples)"


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
