"""Loading user calibration data (.npz, .npy, folders of .npy/.npz or images, dicts, iterables of
dicts): every refusal names the file (or item) and the input; batches stream; memory maps are
released batch by batch."""
from __future__ import annotations

import io
import os
import pickle
import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest

from compiler.calibration_data import (
    CalibrationSet,
    ImageFolder,
    load_calibration,
    model_input_specs,
)
from compiler.errors import CompileError

ONE = {"image": ((1, 3, 4, 4), np.dtype(np.float32))}
TWO = {"image": ((1, 3, 4, 4), np.dtype(np.float32)), "meta": (("N", 5), np.dtype(np.float32))}


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 4, 4)).astype(np.float32)


def _meta(n, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


def _save(tmp_path, name="calib.npz", compressed=False, **arrays):
    path = tmp_path / name
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _refused(source, specs, *fragments):
    with pytest.raises(CompileError) as info:
        load_calibration(source, specs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------- accepted data


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_two_inputs_batches_cover_all_samples(tmp_path, compressed):
    images, meta = _images(10), _meta(10)
    path = _save(tmp_path, compressed=compressed, image=images, meta=meta)
    data = load_calibration(path, TWO)
    assert isinstance(data, CalibrationSet)
    assert data.num_samples == 10 and data.input_names == ["image", "meta"]
    batches = list(data.batches(3))
    assert [b["image"].shape for b in batches] == [(3, 3, 4, 4)] * 3 + [(1, 3, 4, 4)]
    assert [b["meta"].shape for b in batches] == [(3, 5)] * 3 + [(1, 5)]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)
    np.testing.assert_array_equal(np.concatenate([b["meta"] for b in batches]), meta)
    # re-iterable, any batch size
    assert sum(len(b["image"]) for b in data.batches(1)) == 10
    assert sum(len(b["image"]) for b in data.batches(64)) == 10


def test_float64_cast_silently_and_single_array_any_key(tmp_path):
    images = _images(4).astype(np.float64)
    path = _save(tmp_path, whatever=images)
    data = load_calibration(path, ONE)
    (batch,) = list(data.batches(4))
    assert batch["image"].dtype == np.float32 and batch["image"].flags.c_contiguous
    np.testing.assert_array_equal(batch["image"], images.astype(np.float32))


def test_dict_source_slices_without_copying():
    images = _images(6)
    data = load_calibration({"image": images}, ONE)
    for i, batch in enumerate(data.batches(2)):
        assert np.shares_memory(batch["image"], images)  # a view, not a copy
        np.testing.assert_array_equal(batch["image"], images[2 * i:2 * i + 2])


def test_bare_array_for_a_one_input_model():
    images = _images(5)
    data = load_calibration(images, ONE)
    batches = list(data.batches(2))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)


def test_bare_array_for_a_two_input_model_is_refused():
    _refused(_images(3), TWO, "one-input model", "image", "meta")


def test_npy_file_for_one_input_is_memory_mapped(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _images(5))
    data = load_calibration(path, ONE)
    first = next(data.batches(2))["image"]
    assert isinstance(first.base, np.memmap) or isinstance(first, np.memmap)


def test_symbolic_batch_and_model_input_specs():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2, 3])
    w = onnx.numpy_helper.from_array(np.ones((3,), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                                   "g", [x, onnx.helper.make_tensor_value_info(
                                       "w", onnx.TensorProto.FLOAT, [3])],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)], [w])
    specs = model_input_specs(onnx.helper.make_model(graph))
    assert specs == {"x": (("batch", 2, 3), np.dtype(np.float32))}  # the initializer is skipped
    data = load_calibration({"x": np.zeros((7, 2, 3))}, specs)
    assert data.num_samples == 7 and data.sample_shape("x") == (2, 3)


def test_npz_batches_stream_bounded_memory(tmp_path):
    """Iterating over an 8 MB file in batches of 4 samples allocates about one batch at a time."""
    big = np.random.default_rng(0).normal(size=(512, 3, 32, 32)).astype(np.float32)  # 6 MB
    specs = {"image": ((1, 3, 32, 32), np.dtype(np.float32))}
    path = _save(tmp_path, image=big)
    del big
    data = load_calibration(path, specs)
    tracemalloc.start()
    try:
        seen = 0
        for batch in data.batches(4):
            seen += len(batch["image"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 512
    batch_bytes = 4 * 3 * 32 * 32 * 4  # 48 KB
    assert peak < 8 * batch_bytes, peak  # the whole array would be 6 MB


def test_int_input_accepts_ints_that_fit():
    specs = {"ids": ((1, 3), np.dtype(np.int64))}
    data = load_calibration({"ids": np.arange(6, dtype=np.uint8).reshape(2, 3)}, specs)
    assert next(data.batches(2))["ids"].dtype == np.int64
    _refused({"ids": np.array([[0, 1, 2**40]])}, {"ids": ((1, 3), np.dtype(np.int32))},
             "input 'ids'", "do not fit")


# --------------------------------------------------------------------------- refusals


def test_missing_input_named(tmp_path):
    path = _save(tmp_path, image=_images(2))
    _refused(path, TWO, str(path), "no array for model input(s) 'meta'")


def test_extra_array_named(tmp_path):
    path = _save(tmp_path, image=_images(2), meta=_meta(2), labels=np.zeros(2))
    _refused(path, TWO, str(path), "'labels' match no model input")


def test_two_arrays_for_one_input_model(tmp_path):
    path = _save(tmp_path, image=_images(2), other=_images(2))
    _refused(path, ONE, "'other' match no model input", "model inputs: 'image'")


def test_wrong_sample_shape_named(tmp_path):
    path = _save(tmp_path, image=np.zeros((2, 3, 5, 5), np.float32), meta=_meta(2))
    _refused(path, TWO, str(path), "input 'image'", "(3, 4, 4)", "(3, 5, 5)")
    # a missing samples axis is a shape error too
    _refused({"image": np.zeros((3, 4, 4), np.float32)}, ONE, "input 'image'", "(3, 4, 4)")


def test_wrong_dtype_kind_named(tmp_path):
    path = _save(tmp_path, image=np.zeros((2, 3, 4, 4), np.uint8))
    _refused(path, ONE, str(path), "input 'image'", "uint8", "float32")


def test_non_finite_counted_and_named(tmp_path):
    images = _images(6)
    images[1, 0, 0, 0] = np.nan
    images[4, 2, 1, 1] = np.inf
    images[4, 2, 1, 2] = -np.inf
    path = _save(tmp_path, image=images, meta=_meta(6))
    _refused(path, TWO, str(path), "input 'image'", "3 non-finite", "1 NaN", "2 infinite",
             "2 sample(s): 1, 4")


def test_float64_overflowing_float32_is_non_finite():
    images = _images(2).astype(np.float64)
    images[0, 0, 0, 0] = 1e300
    _refused({"image": images}, ONE, "input 'image'", "1 non-finite", "float32")


def test_different_sample_counts(tmp_path):
    path = _save(tmp_path, image=_images(4), meta=_meta(3))
    _refused(path, TWO, str(path), "'image' has 4", "'meta' has 3")


def test_zero_samples(tmp_path):
    path = _save(tmp_path, image=np.zeros((0, 3, 4, 4), np.float32))
    _refused(path, ONE, str(path), "no samples", "'image'")


def test_fixed_batch_other_than_one():
    specs = {"image": ((4, 3, 4, 4), np.dtype(np.float32))}
    _refused({"image": _images(8)}, specs, "input 'image'", "fixed batch size of 4")


def test_not_an_npz(tmp_path):
    path = tmp_path / "calib.npz"
    path.write_text("image,1,2,3\n")
    _refused(path, ONE, str(path), "not a valid .npz")
    _refused(tmp_path / "absent.npz", ONE, "absent.npz", "no such file")


def test_zip_with_a_non_array_member(tmp_path):
    path = tmp_path / "calib.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    _refused(path, ONE, str(path), "'readme.txt' is not a .npy array")


def test_truncated_member(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, _images(4))
    path = tmp_path / "calib.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("image.npy", buf.getvalue()[:-100])
    _refused(path, ONE, str(path), "'image' is truncated")


class _Exploit:
    """Unpickling this would create a file: the loader must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_array_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.array([_Exploit(str(marker)), 1], dtype=object)
    path = tmp_path / "calib.npz"
    np.savez(path, image=payload)  # numpy pickles object arrays
    assert b"pwned" in path.read_bytes() and pickle  # the pickle really is in the file
    _refused(path, ONE, str(path), "'image' holds Python objects")
    assert not marker.exists()
    npy = tmp_path / "calib.npy"
    np.save(npy, payload)
    _refused(npy, ONE, str(npy), "Python objects")
    assert not marker.exists()
    _refused({"image": payload}, ONE, "'image' holds Python objects")


def test_batch_size_must_be_positive():
    data = load_calibration({"image": _images(2)}, ONE)
    with pytest.raises(CompileError, match="batch size"):
        next(data.batches(0))


def test_fortran_ordered_member_reads_correctly(tmp_path):
    """A Fortran-ordered array (samples not contiguous on disk) is read whole, still correctly."""
    images = _images(5)
    path = _save(tmp_path, image=np.asfortranarray(images))
    data = load_calibration(path, ONE)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in data.batches(2)]), images)


# --------------------------------------------------------------------------- folders


def _mapped(path) -> bool:
    """Whether this process currently memory-maps ``path`` (Linux /proc)."""
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")


@needs_proc
def test_npy_maps_each_batch_and_releases_it(tmp_path):
    """A stacked .npy is mapped one batch at a time and unmapped after it, so the pages read do
    not stay resident (one map of the whole file would keep them all)."""
    path = tmp_path / "x.npy"
    images = _images(7)
    np.save(path, images)
    data = load_calibration(path, ONE)
    assert not _mapped(path)  # the validation pass let its maps go
    seen = []
    for batch in data.batches(3):
        seen.append(batch["image"].copy())
        assert _mapped(path)
        del batch
    assert not _mapped(path)
    np.testing.assert_array_equal(np.concatenate(seen), images)


def test_folder_of_per_input_npy(tmp_path):
    images, meta = _images(5), _meta(5)
    np.save(tmp_path / "image.npy", images)
    np.save(tmp_path / "meta.npy", meta)
    (tmp_path / "README.txt").write_text("ignored")
    data = load_calibration(tmp_path, TWO)
    assert data.num_samples == 5
    batches = list(data.batches(2))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)
    np.testing.assert_array_equal(np.concatenate([b["meta"] for b in batches]), meta)


def test_folder_of_one_sample_npy_files_in_name_order(tmp_path):
    images = _images(4)
    for k in range(4):  # with and without the leading batch axis of 1, float64 cast
        sample = images[k:k + 1] if k % 2 else images[k].astype(np.float64)
        np.save(tmp_path / f"sample_{k:03d}.npy", sample)
    data = load_calibration(tmp_path, ONE)
    assert data.num_samples == 4
    got = np.concatenate([b["image"] for b in data.batches(3)])
    np.testing.assert_array_equal(got, images)
    assert got.dtype == np.float32


def test_folder_of_one_sample_npz_files(tmp_path):
    images, meta = _images(3), _meta(3)
    for k in range(3):
        np.savez(tmp_path / f"s{k}.npz", image=images[k], meta=meta[k:k + 1])
    data = load_calibration(tmp_path, TWO)
    batch = next(data.batches(3))
    np.testing.assert_array_equal(batch["image"], images)
    np.testing.assert_array_equal(batch["meta"], meta)


def test_folder_errors_name_the_file(tmp_path):
    np.save(tmp_path / "a.npy", _images(1)[0])
    np.save(tmp_path / "b.npy", np.zeros((3, 5, 4), np.float32))
    _refused(tmp_path, ONE, f"'{tmp_path / 'b.npy'}'", "(3, 4, 4)", "(3, 5, 4)")
    (tmp_path / "b.npy").unlink()
    np.save(tmp_path / "c.npy", np.full((3, 4, 4), np.nan, np.float32))
    _refused(tmp_path, ONE, "48 non-finite")
    (tmp_path / "c.npy").unlink()
    np.savez(tmp_path / "d.npz", image=_images(1))
    _refused(tmp_path, ONE, "mixes '.npy' and '.npz'")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, ONE, "holds no .npy, .npz or image files")
    _refused(tmp_path / "missing", ONE, "no such file or folder")


def test_folder_of_one_sample_npy_needs_one_input(tmp_path):
    np.save(tmp_path / "a.npy", _images(1)[0])
    _refused(tmp_path, TWO, "one-sample .npy files feed a one-input model")


# --------------------------------------------------------------------------- images

PIL = pytest.importorskip("PIL.Image")
RGB_MODEL = {"image": ((1, 3, 4, 6), np.dtype(np.float32))}


def _write_images(folder, count=3, size=(6, 4), seed=0):
    """``count`` random RGB PNGs of ``size`` (W, H); returns their pixels (H, W, 3), name order."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = []
    for k in range(count):
        p = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        PIL.fromarray(p).save(folder / f"img{k}.png")
        pixels.append(p)
    return pixels


def test_image_folder_preprocessing_nchw_rgb_and_bgr(tmp_path):
    pixels = _write_images(tmp_path / "imgs")
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    for order in ("rgb", "bgr"):
        folder = ImageFolder(str(tmp_path / "imgs"), mean=mean, std=std, channel_order=order)
        data = load_calibration(folder, RGB_MODEL)
        assert data.num_samples == 3 and "mean [123.675" in data.origin
        got = np.concatenate([b["image"] for b in data.batches(2)])
        for k, p in enumerate(pixels):
            chans = p[..., ::-1] if order == "bgr" else p
            expected = ((chans.astype(np.float64) - mean) / std).transpose(2, 0, 1)
            np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-5)


def test_image_folder_nhwc_grayscale_and_resize(tmp_path):
    _write_images(tmp_path / "imgs", count=2, size=(12, 8))
    gray = {"x": ((1, 4, 6, 1), np.dtype(np.float32))}  # NHWC, one channel
    data = load_calibration(ImageFolder(str(tmp_path / "imgs"), std=(255.0,)), gray)
    batch = next(data.batches(2))["x"]
    assert batch.shape == (2, 4, 6, 1) and 0 <= batch.min() and batch.max() <= 1
    # a uniform image stays uniform through stretch and crop resizing
    flat = tmp_path / "flat"
    flat.mkdir()
    PIL.fromarray(np.full((9, 20, 3), 200, np.uint8)).save(flat / "a.png")
    for mode in ("stretch", "crop"):
        x = next(load_calibration(ImageFolder(str(flat), resize=mode), RGB_MODEL).batches(1))
        np.testing.assert_array_equal(x["image"], np.full((1, 3, 4, 6), 200.0, np.float32))


def test_image_folder_errors(tmp_path):
    _write_images(tmp_path / "imgs", count=2)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_calibration(ImageFolder(str(tmp_path / "imgs")), RGB_MODEL)
    with pytest.raises(CompileError, match=r"calibration image '.*broken\.jpg': cannot be decoded"):
        list(data.batches(1))
    folder = str(tmp_path / "imgs")
    _refused(ImageFolder(folder, size=(5, 5)), RGB_MODEL, "--size 5x5 does not match")
    _refused(ImageFolder(folder, mean=(1.0, 2.0)), RGB_MODEL, "mean needs 1 or 3 finite values")
    _refused(ImageFolder(folder, std=(0.0,)), RGB_MODEL, "std must not be 0")
    _refused(ImageFolder(folder), TWO, "a folder of images feeds a one-input model")
    _refused(ImageFolder(folder), {"image": ((1, 5, 4, 4), np.dtype(np.float32))},
             "has 5 channels")


def test_image_folder_compiles_through_the_cli(tmp_path):
    """--calib FOLDER with image options, end to end on the builder's small ResNet."""
    from compiler.cli import main
    from tools.model_zoo import resnet_tiny, save_model

    save_model(resnet_tiny(), tmp_path / "m.onnx")
    _write_images(tmp_path / "imgs", count=4, size=(40, 36))
    code = main(["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "out"), "--mean", "127.5", "--std", "127.5",
                 "--resize", "crop", "--calib-method", "mse", "--no-progress"])
    assert code == 0
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "on 4 samples (mse; calibration data images" in report and "resize crop" in report


# --------------------------------------------------------------------------- iterables


def test_iterable_of_dicts_rebatched():
    images = _images(7)
    items = [{"image": images[0]}, {"image": images[1:4]}, {"image": images[4:7]}]
    data = load_calibration(items, ONE)
    assert data.num_samples is None
    batches = list(data.batches(2))
    assert [len(b["image"]) for b in batches] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)
    assert data.num_samples == 7
    assert sum(len(b["image"]) for b in data.batches(5)) == 7  # a list reads again


def test_generator_reads_once_and_says_so():
    data = load_calibration(({"image": x} for x in _images(3)), ONE)
    assert sum(len(b["image"]) for b in data.batches(1)) == 3
    with pytest.raises(CompileError, match="one-shot iterator"):
        next(data.batches(1))


def test_iterable_item_errors_name_the_item():
    good = {"image": _images(1)[0], "meta": _meta(1)[0]}
    cases = [
        ([good, {"image": _images(1)[0]}], "item 1: no array for model input(s) 'meta'"),
        ([good, {**good, "extra": 1}], "item 1: key(s) 'extra' match no model input"),
        ([{**good, "meta": np.zeros(4)}], "item 0: input 'meta'"),
        ([{**good, "meta": np.array([1, np.inf, 0, 0, 0])}], "item 0: input 'meta' has 1 non-finite"),
        ([good, [1, 2]], "item 1 is a list"),
        ([], "no samples"),
    ]
    for items, fragment in cases:
        data = load_calibration(items, TWO)
        with pytest.raises(CompileError) as info:
            list(data.batches(2))
        assert fragment in str(info.value), (fragment, str(info.value))
