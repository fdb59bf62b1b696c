"""The .qir file: a zip archive of ``program.json`` plus one ``.npy`` member per array.

program.json holds everything but arrays (sorted keys); an array is referenced by its member
name ("arrays/00000.npy", numbered in file order: tensors by name, then each layer's params by
key). Tuples in attrs come back as lists.
Members are written in a fixed order with a fixed timestamp and np.save(allow_pickle=False), so
the same program always gives the same bytes; members of 64 KiB or more (weight tensors) are
stored, smaller ones deflated. The file is written to a temporary file in the
target folder and renamed into place.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import zipfile

import numpy as np

from .errors import ProgramError
from .ir import IR_VERSION, Layer, Program, TensorInfo

FORMAT = "qlower-ir"
PROGRAM_MEMBER = "program.json"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# Members of at least this many bytes are stored, not deflated: they are int8 weight tensors,
# near-random bytes that deflate shrinks by ~8% at ~50 MB/s (a ResNet-50 .qir: 25.9 MB raw,
# 23.4 MB deflated in 0.6 s, 25.7 MB with this rule in 0.01 s). Smaller members (program.json,
# biases, scales, multipliers) compress well and cost little.
_STORE_AT = 1 << 16


def _json_value(value, where: str):
    """Attrs and metadata as plain JSON: numpy scalars/arrays become numbers/lists, tuples lists."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, where) for k, v in value.items()}
    raise ProgramError(f"{where}: cannot store a {type(value).__name__} in program.json")


class _Arrays:
    """Collects arrays under numbered member names, in the order they are added."""

    def __init__(self):
        self.members: list[tuple[str, np.ndarray]] = []

    def add(self, array) -> str:
        name = f"arrays/{len(self.members):05d}.npy"
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise ProgramError(f"cannot store an array of dtype {array.dtype}")
        self.members.append((name, np.ascontiguousarray(array)))
        return name


def program_to_json(program: Program) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """The JSON document of a program and its (member name, array) list."""
    arrays = _Arrays()
    tensors = []
    for name, t in sorted(program.tensors.items()):  # canonical: the table's order means nothing
        tensors.append(
            {"name": name, "dtype": t.dtype, "shape": list(t.shape), "axis": t.axis,
             "scale": arrays.add(t.scale), "zero_point": arrays.add(t.zero_point)}
        )
    layers = []
    for layer in program.layers:
        where = f"layer '{layer.name}'"
        layers.append(
            {
                "name": layer.name, "op": layer.op, "kind": layer.kind,
                "inputs": list(layer.inputs), "outputs": list(layer.outputs),
                "attrs": _json_value(dict(layer.attrs), where),
                "params": {key: arrays.add(layer.params[key]) for key in sorted(layer.params)},
                "acc_dtype": layer.acc_dtype, "rounding": layer.rounding,
                "source_nodes": list(layer.source_nodes),
            }
        )
    doc = {
        "format": FORMAT, "version": int(program.version),
        "inputs": list(program.inputs), "outputs": list(program.outputs),
        "metadata": _json_value(dict(program.metadata), "metadata"),
        "tensors": tensors, "layers": layers,
    }
    return doc, arrays.members


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED if len(data) >= _STORE_AT else zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    zf.writestr(info, data, compresslevel=6)


def save_program(program: Program, path) -> None:
    """Write ``program`` to ``path`` (.qir); byte-identical for identical programs."""
    doc, members = program_to_json(program)
    text = json.dumps(doc, sort_keys=True, indent=1, allow_nan=True).encode("utf-8")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w") as zf:
            _write_member(zf, PROGRAM_MEMBER, text)
            for name, array in members:
                _write_member(zf, name, _npy_bytes(array))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_program(path) -> Program:
    """Read a .qir file; ProgramError if it is not one, or was written by a newer IR version."""
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ProgramError(f"{path}: not a .qir file ({e})") from e
    with zf:
        try:
            doc = json.loads(zf.read(PROGRAM_MEMBER).decode("utf-8"))
        except KeyError:
            raise ProgramError(f"{path}: not a .qir file (no {PROGRAM_MEMBER})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ProgramError(f"{path}: {PROGRAM_MEMBER} is not valid JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else None
            raise ProgramError(f"{path}: not a .qir file (format is {found!r})")
        version = doc.get("version")
        if not isinstance(version, int) or version < 1 or version > IR_VERSION:
            newer = isinstance(version, int) and version > IR_VERSION
            raise ProgramError(
                f"{path}: IR version {version!r} is not supported; this runtime reads versions 1..{IR_VERSION}"
                + (" (the file was written by a newer qlower)" if newer else "")
            )

        def array(member: str) -> np.ndarray:
            try:
                with zf.open(member) as f:
                    return np.load(io.BytesIO(f.read()), allow_pickle=False)
            except KeyError:
                raise ProgramError(f"{path}: missing array member {member}") from None
            except ValueError as e:
                raise ProgramError(f"{path}: bad array member {member} ({e})") from e

        try:
            tensors = {
                t["name"]: TensorInfo(
                    name=t["name"], dtype=t["dtype"], shape=tuple(t["shape"]),
                    scale=array(t["scale"]), zero_point=array(t["zero_point"]), axis=t["axis"],
                )
                for t in doc["tensors"]
            }
            layers = [
                Layer(
                    name=l["name"], op=l["op"], kind=l["kind"],
                    inputs=list(l["inputs"]), outputs=list(l["outputs"]), attrs=dict(l["attrs"]),
                    params={key: array(member) for key, member in l["params"].items()},
                    acc_dtype=l["acc_dtype"], rounding=l["rounding"], source_nodes=list(l["source_nodes"]),
                )
                for l in doc["layers"]
            ]
            return Program(
                inputs=list(doc["inputs"]), outputs=list(doc["outputs"]), tensors=tensors,
                layers=layers, metadata=dict(doc["metadata"]), version=version,
            )
        except (KeyError, TypeError) as e:
            raise ProgramError(f"{path}: malformed {PROGRAM_MEMBER} (missing or bad field {e})") from e
