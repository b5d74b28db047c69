"""Safe reading and atomic writing of ONNX models, and the summary behind ``shiftc inspect``.

Reading (:func:`load_model`) treats the file as untrusted: every way it can be malformed,
truncated or unsafe ends in one :class:`~shiftc.errors.BadInputError` naming the file (and the
tensor, for external data) and saying what to do. External data locations are validated --
relative, no ``..``, resolving (symlinks included) inside the model's folder, file present and
long enough -- before any of them is opened.

Writing (:func:`save_model`, :func:`atomic_output`) goes through a temporary file in the
destination folder that is renamed into place only once it is complete, so a failed write never
leaves partial output and never damages a file already at the destination.
"""

from __future__ import annotations

import contextlib
import math
import ntpath
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import onnx
from onnx import GraphProto, ModelProto, TensorProto

from shiftc.errors import BadInputError, UsageError

__all__ = ["atomic_output", "load_model", "model_summary", "save_model"]

#: Protobuf cannot hold a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Above this serialized size :func:`save_model` moves weights to an external data file.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
#: Initializers smaller than this stay inline when saving with external data (as onnx does).
EXTERNAL_TENSOR_MIN_BYTES = 1024
#: Offsets of tensors in the external data file are multiples of this.
EXTERNAL_DATA_ALIGNMENT = 64
_CHUNK = 64 * 2**20
#: The location the checker sees for external tensors; a leading '#' tells the onnx checker
#: not to look at the file system (locations are validated by shiftc instead).
_CHECKER_LOCATION = "#shiftc-external-data-validated-separately"

_REDO = "re-export or re-download the model"

# ONNX data type name -> (shiftc dtype name, bits per element; None for strings).
_DTYPES_BY_ONNX_NAME: dict[str, tuple[str, int | None]] = {
    "FLOAT": ("float32", 32),
    "UINT8": ("uint8", 8),
    "INT8": ("int8", 8),
    "UINT16": ("uint16", 16),
    "INT16": ("int16", 16),
    "INT32": ("int32", 32),
    "INT64": ("int64", 64),
    "STRING": ("string", None),
    "BOOL": ("bool", 8),
    "FLOAT16": ("float16", 16),
    "DOUBLE": ("float64", 64),
    "UINT32": ("uint32", 32),
    "UINT64": ("uint64", 64),
    "COMPLEX64": ("complex64", 64),
    "COMPLEX128": ("complex128", 128),
    "BFLOAT16": ("bfloat16", 16),
    "FLOAT8E4M3FN": ("float8_e4m3fn", 8),
    "FLOAT8E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "FLOAT8E5M2": ("float8_e5m2", 8),
    "FLOAT8E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "UINT4": ("uint4", 4),
    "INT4": ("int4", 4),
    "FLOAT4E2M1": ("float4_e2m1fn", 4),
    "FLOAT8E8M0": ("float8_e8m0fnu", 8),
    "UINT2": ("uint2", 2),
    "INT2": ("int2", 2),
    "FLOAT6E2M3": ("float6_e2m3fn", 6),
    "FLOAT6E3M2": ("float6_e3m2fn", 6),
}
_DTYPES: dict[int, tuple[str, int | None]] = {
    TensorProto.DataType.Value(name): info
    for name, info in _DTYPES_BY_ONNX_NAME.items()
    if name in TensorProto.DataType.keys()
}


def dtype_name(data_type: int) -> str:
    """The numpy-style name of an ONNX ``TensorProto.DataType`` ("float32", "int4", ...)."""
    info = _DTYPES.get(data_type)
    return info[0] if info else f"dtype{data_type}"


def _numel(dims) -> int:
    return math.prod(int(d) for d in dims)


def _expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's data takes in raw form, or None where that is not fixed (strings)."""
    info = _DTYPES.get(tensor.data_type)
    if info is None or info[1] is None:
        return None
    return (_numel(tensor.dims) * info[1] + 7) // 8


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line or type(exc).__name__


# --------------------------------------------------------------------------------------------
# walking every tensor of a model


def _node_label(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def _tensor_label(tensor: TensorProto, where: str) -> str:
    name = f"tensor '{tensor.name}'" if tensor.name else "an unnamed tensor"
    return f"{name} ({where})" if where else name


def _graph_tensors(graph: GraphProto) -> Iterator[tuple[TensorProto, str]]:
    for t in graph.initializer:
        yield t, "initializer"
    for sp in graph.sparse_initializer:
        yield sp.values, "values of a sparse initializer"
        yield sp.indices, "indices of a sparse initializer"
    yield from _nodes_tensors(graph.node)


def _nodes_tensors(nodes) -> Iterator[tuple[TensorProto, str]]:
    for node in nodes:
        for attr in node.attribute:
            where = f"attribute '{attr.name}' of {_node_label(node)}"
            if attr.HasField("t"):
                yield attr.t, where
            for t in attr.tensors:
                yield t, where
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values, where
                yield attr.sparse_tensor.indices, where
            for sp in attr.sparse_tensors:
                yield sp.values, where
                yield sp.indices, where
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


def _model_tensors(model: ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """Every TensorProto that can hold data, in the graph, subgraphs, functions, training info."""
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        yield from _nodes_tensors(fn.node)
    for ti in model.training_info:
        if ti.HasField("initialization"):
            yield from _graph_tensors(ti.initialization)
        if ti.HasField("algorithm"):
            yield from _graph_tensors(ti.algorithm)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


# --------------------------------------------------------------------------------------------
# loading


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> ModelProto:
    """Read an ONNX model file, treating it as untrusted.

    Raises :class:`BadInputError` (naming the file, and the tensor where it applies) when the
    path is missing, a directory or empty; when the bytes are not a well-formed ONNX model
    (unparseable, truncated, failing ``onnx.checker``); when the file is over protobuf's 2 GiB
    limit; or when an external data reference is absolute, contains ``..``, resolves (through
    symlinks too) outside the model's folder, names a missing file or one too short for its
    offset and length. Locations are all validated before any external file is opened.

    With ``load_external_data=False`` the locations are still validated but the data stays on
    disk (the tensors keep their external references, relative to the model's folder).
    """
    path = os.fspath(path)
    data = _read_model_bytes(path)
    model = _parse_model(path, data)
    _check_structure(path, model)
    _check_text_fields(path, model)
    external = [(t, where) for t, where in _model_tensors(model) if _is_external(t)]
    _run_checker(path, model, data, external)
    del data
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    plans = [_plan_external_read(path, folder, t, where) for t, where in external]
    if load_external_data:
        for (tensor, where), plan in zip(external, plans):
            _read_external(path, tensor, where, *plan)
    return model


def _read_model_bytes(path: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file; check the model path.") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot access the model file ({e.strerror}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInputError(
            f"{path}: is a directory, not an ONNX model file; pass the path of the .onnx file."
        )
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"{path}: is not a regular file; pass the path of an .onnx file.")
    if st.st_size == 0:
        raise BadInputError(f"{path}: the file is empty (0 bytes); {_REDO}.")
    if st.st_size > PROTOBUF_LIMIT:
        raise BadInputError(
            f"{path}: the file is {st.st_size / 2**30:.2f} GiB, over protobuf's 2 GiB limit, so it "
            "cannot be a valid ONNX model; a model this large must keep its weights in an "
            "external data file -- re-export it with external data (e.g. onnx.save_model(model, "
            "path, save_as_external_data=True))."
        )
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the model file ({e.strerror}).") from None


def _parse_model(path: str, data: bytes) -> ModelProto:
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # DecodeError, RuntimeError, ... -- whatever the parser throws
        raise BadInputError(
            f"{path}: not a valid ONNX model (protobuf could not parse it: {_first_line(e)}); "
            f"the file is corrupted, truncated or not ONNX -- {_REDO}."
        ) from None
    return model


def _check_structure(path: str, model: ModelProto) -> None:
    """Catch bytes that parse as protobuf but are no ONNX model (truncated, random, other)."""
    corrupt = f"the file is corrupted, truncated or not ONNX -- {_REDO}"
    if not model.HasField("ir_version") or model.ir_version < 1:
        raise BadInputError(f"{path}: not a valid ONNX model (no ir_version); {corrupt}.")
    if model.ir_version > onnx.IR_VERSION:
        raise BadInputError(
            f"{path}: the model's ONNX IR version {model.ir_version} is newer than the "
            f"{onnx.IR_VERSION} this shiftc supports; re-export it with an older exporter/opset "
            "or upgrade onnx."
        )
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise BadInputError(
            f"{path}: not a valid ONNX model (no graph, or no nodes and outputs); {corrupt}."
        )


_TEXT_FIELDS: dict[str, tuple[list[Any], list[Any]]] = {}


def _text_and_message_fields(descriptor) -> tuple[list[Any], list[Any]]:
    fields = _TEXT_FIELDS.get(descriptor.full_name)
    if fields is None:
        text = [fd for fd in descriptor.fields if fd.type == fd.TYPE_STRING]
        msgs = [fd for fd in descriptor.fields if fd.type == fd.TYPE_MESSAGE]
        fields = _TEXT_FIELDS[descriptor.full_name] = (text, msgs)
    return fields


def _check_text_fields(path: str, model: ModelProto) -> None:
    """Refuse text (string) fields that are not valid UTF-8.

    The protobuf runtime hands those back as ``bytes`` instead of ``str``, which would make
    later code fail in confusing ways; a flipped byte in a name is a corrupted file.
    Bytes fields (tensor data) are never touched, so this costs nothing per weight.
    """
    stack: list[tuple[Any, str]] = [(model, "model")]
    while stack:
        msg, where = stack.pop()
        text_fields, msg_fields = _text_and_message_fields(msg.DESCRIPTOR)
        for fd in text_fields:
            if fd.is_repeated:
                for i, value in enumerate(getattr(msg, fd.name)):
                    if type(value) is not str:
                        _bad_text(path, f"{where}.{fd.name}[{i}]")
            elif msg.HasField(fd.name) and type(getattr(msg, fd.name)) is not str:
                _bad_text(path, f"{where}.{fd.name}")
        for fd in msg_fields:
            if fd.is_repeated:
                subs = getattr(msg, fd.name)
                stack.extend((sub, f"{where}.{fd.name}[{i}]") for i, sub in enumerate(subs))
            elif msg.HasField(fd.name):
                stack.append((getattr(msg, fd.name), f"{where}.{fd.name}"))


def _bad_text(path: str, where: str) -> None:
    raise BadInputError(
        f"{path}: not a valid ONNX model (text field {where} is not valid UTF-8); the file is "
        f"corrupted -- {_REDO}."
    )


def _run_checker(
    path: str, model: ModelProto, data: bytes, external: list[tuple[TensorProto, str]]
) -> None:
    """``onnx.checker.check_model(full_check=False)`` on the model, external data not loaded.

    The onnx checker would resolve external locations against the current directory (it does
    not know the model's folder), so external tensors are shown to it with a '#' location
    that it skips; shiftc validates the real locations itself.
    """
    saved: list[tuple[onnx.StringStringEntryProto, str]] = []
    try:
        for tensor, _ in external:
            for entry in tensor.external_data:
                if entry.key == "location":
                    saved.append((entry, entry.value))
                    entry.value = _CHECKER_LOCATION
        blob = model.SerializeToString() if saved else data
    except Exception as e:
        raise BadInputError(
            f"{path}: not a valid ONNX model ({_first_line(e)}); {_REDO}."
        ) from None
    finally:
        for entry, value in saved:
            entry.value = value
    try:
        onnx.checker.check_model(blob, full_check=False)
    except Exception as e:  # ValidationError and anything else the checker raises
        raise BadInputError(
            f"{path}: invalid ONNX model: {_first_line(e)}; {_REDO}, or check it with "
            "onnx.checker.check_model for details."
        ) from None


def _safe_location(path: str, folder: str, label: str, location: str) -> tuple[str, str]:
    """(the joined path, its real path) of an external data location, refused unless it is a
    relative path to a file inside the model's folder."""
    unsafe = (
        f"{path}: refusing to read external data of {label}: its location {location!r} "
        f"%s (path traversal); external data must be a relative path to a file inside the "
        f"model's folder {folder} -- move the data file there and fix the location."
    )
    if "\x00" in location:
        raise BadInputError(unsafe % "contains a NUL character")
    if os.path.isabs(location) or ntpath.isabs(location) or ntpath.splitdrive(location)[0]:
        raise BadInputError(unsafe % "is an absolute path")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise BadInputError(unsafe % "has a '..' component")
    candidate = os.path.join(folder, *[p for p in parts if p not in ("", ".")])
    resolved = os.path.realpath(candidate)
    if resolved == folder or os.path.commonpath([resolved, folder]) != folder:
        raise BadInputError(
            unsafe % f"resolves (through a symbolic link) to {resolved}, outside the folder"
        )
    return candidate, resolved


def _plan_external_read(
    path: str, folder: str, tensor: TensorProto, where: str
) -> tuple[str, int, int]:
    """Validate one external data reference; return (resolved file, offset, length)."""
    label = _tensor_label(tensor, where)
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise BadInputError(
                f"{path}: {label} lists external data key '{entry.key}' twice; {_REDO}."
            )
        entries[entry.key] = entry.value
    location = entries.get("location", "")
    if not location:
        raise BadInputError(f"{path}: {label} is stored externally but has no location; {_REDO}.")
    candidate, resolved = _safe_location(path, folder, label, location)

    def offset_or_length(key: str) -> int | None:
        if key not in entries:
            return None
        try:
            value = int(entries[key])
        except ValueError:
            value = -1
        if value < 0:
            raise BadInputError(
                f"{path}: {label} has an invalid external data {key} {entries[key]!r} "
                f"(want a non-negative integer); {_REDO}."
            )
        return value

    offset = offset_or_length("offset") or 0
    length = offset_or_length("length")
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise BadInputError(
            f"{path}: the external data file {location!r} of {label} is missing (looked for "
            f"{candidate}); copy it next to the model."
        ) from None
    except OSError as e:
        raise BadInputError(
            f"{path}: cannot access the external data file {location!r} of {label} ({e.strerror})."
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(
            f"{path}: the external data location {location!r} of {label} is not a regular file; "
            f"{_REDO}."
        )
    if length is None:
        length = st.st_size - offset
    if offset + length > st.st_size or length < 0:
        raise BadInputError(
            f"{path}: the external data file {location!r} is too short for {label}: it has "
            f"{st.st_size} bytes but the tensor needs bytes {offset}..{offset + max(length, 0)}; "
            f"the data file is truncated or belongs to another model -- {_REDO}."
        )
    expected = _expected_nbytes(tensor)
    if expected is not None and length != expected:
        raise BadInputError(
            f"{path}: {label} has {length} bytes of external data in {location!r} but its shape "
            f"{list(tensor.dims)} of {dtype_name(tensor.data_type)} needs {expected}; {_REDO}."
        )
    return resolved, offset, length


def _read_external(
    path: str, tensor: TensorProto, where: str, resolved: str, offset: int, length: int
) -> None:
    label = _tensor_label(tensor, where)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(resolved, flags)
        with os.fdopen(fd, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
    except OSError as e:
        raise BadInputError(
            f"{path}: cannot read the external data of {label} from {resolved} ({e.strerror})."
        ) from None
    if len(blob) != length:
        raise BadInputError(
            f"{path}: the external data file {resolved} is too short for {label} (it changed "
            f"while being read?); {_REDO}."
        )
    tensor.raw_data = blob
    tensor.ClearField("data_location")
    del tensor.external_data[:]


# --------------------------------------------------------------------------------------------
# writing


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; set it straight back
    os.umask(mask)
    return mask


def _not_writable(path: str, folder: str, e: OSError) -> BadInputError:
    reason = e.strerror or type(e).__name__
    return BadInputError(
        f"{path}: cannot write the output: folder {folder} is not writable ({reason}); choose "
        "another output path or fix the folder's permissions."
    )


def _make_temp(path: str) -> str:
    """Create (reserve) an empty temporary file beside ``path``; return its path."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise BadInputError(f"{path}: is a directory; give a file name for the output.")
    try:
        os.makedirs(folder, exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(target))
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=ext, dir=folder)
        os.close(fd)
    except OSError as e:
        raise _not_writable(path, folder, e) from None
    return tmp


def _remove_quietly(tmp: str) -> None:
    try:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.unlink(tmp)
    except OSError:
        pass  # already gone, or nothing more to do; never mask the original error


def _prepare_commit(tmp: str, path: str) -> None:
    """Give the temp file the target's permissions (or the umask's) and flush it to disk."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise BadInputError(
            f"{path}: cannot write the output ({e.strerror}); check the disk and the folder's "
            "permissions, or choose another output path."
        ) from None


def _sync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    The temporary file already exists (empty) and keeps ``path``'s extension, so writers that
    pick a format by suffix (``export_library("x.so")``) behave the same. If the block raises,
    the temporary file is deleted and whatever was at ``path`` before is left untouched. Parent
    folders are created; a folder that cannot be written raises :class:`BadInputError`.
    """
    path = os.fspath(path)
    tmp = _make_temp(path)
    try:
        yield tmp
        _prepare_commit(tmp, path)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _not_writable(path, os.path.dirname(os.path.abspath(path)), e) from None
        _sync_folder(os.path.dirname(os.path.abspath(path)))
    finally:
        _remove_quietly(tmp)


def _write_bytes(f, data: bytes | memoryview) -> None:
    """Write ``data`` to the open binary file ``f`` in chunks (one place for tests to break)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start : start + _CHUNK])


def _write_error(path: str, e: OSError) -> BadInputError:
    return BadInputError(
        f"{path}: writing the output failed ({e.strerror or e}); nothing was written -- free disk "
        "space or choose another output path."
    )


def save_model(
    model: ModelProto, path: str | os.PathLike, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data=None`` keeps the weights inline unless the model is over ~1.8 GiB;
    ``True`` always moves initializers of 1 KiB or more (stored as ``raw_data``) into one file
    ``<file name>.data`` beside the model (offsets aligned to 64 bytes); ``False`` never does.
    Both files are written to temporary names and renamed into place (data first, then the
    model; if the model cannot be renamed the previous data file is put back), so no failure
    leaves partial output. ``model`` is left as it was. Parent folders are created.
    """
    path = os.fspath(path)
    if not isinstance(model, ModelProto):
        raise TypeError(f"save_model expects an onnx.ModelProto, got {type(model).__name__}")
    pending = [where for t, where in _model_tensors(model) if _is_external(t)]
    if pending:
        raise UsageError(
            f"cannot save {path}: the model still refers to external data ({pending[0]}); load "
            "it with load_model(..., load_external_data=True) before saving it elsewhere."
        )
    size = model.ByteSize()
    if external_data is None:
        external_data = size > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        if size > PROTOBUF_LIMIT:
            raise UsageError(
                f"cannot save {path}: the model is {size / 2**30:.2f} GiB, over protobuf's 2 GiB "
                "limit; save it with external data (external_data=True or None)."
            )
        _save_file(path, model.SerializeToString())
        return
    _save_with_external_data(model, path)


def _save_file(path: str, data: bytes) -> None:
    with atomic_output(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                _write_bytes(f, data)
        except OSError as e:
            raise _write_error(path, e) from None


def _save_with_external_data(model: ModelProto, path: str) -> None:
    data_name = os.path.basename(os.path.abspath(path)) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), data_name)
    moved: list[tuple[TensorProto, bytes, bool]] = []
    temps: list[str] = []
    try:
        # Move the large initializers' bytes out of the proto, into the data temp file.
        candidates = [
            t
            for t, where in _model_tensors(model)
            if where == "initializer" and t.HasField("raw_data")
            and len(t.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES
        ]
        data_tmp = None
        if candidates:
            data_tmp = _make_temp(data_path)
            temps.append(data_tmp)
            _move_to_data_file(candidates, data_tmp, data_path, data_name, moved)
        if model.ByteSize() > PROTOBUF_LIMIT:
            raise UsageError(
                f"cannot save {path}: even with its initializers in external data the model is "
                "over protobuf's 2 GiB limit (large Constant nodes or attributes?); turn those "
                "into initializers first."
            )
        blob = model.SerializeToString()
        model_tmp = _make_temp(path)
        temps.append(model_tmp)
        try:
            with open(model_tmp, "wb") as f:
                _write_bytes(f, blob)
        except OSError as e:
            raise _write_error(path, e) from None
        del blob
        _commit_pair(data_tmp, data_path, model_tmp, path)
    finally:
        for tmp in temps:
            _remove_quietly(tmp)
        for t, raw, had_location in moved:
            del t.external_data[:]
            t.ClearField("data_location")
            if had_location:
                t.data_location = TensorProto.DEFAULT
            t.raw_data = raw


def _move_to_data_file(tensors: list[TensorProto], data_tmp: str, data_path: str, data_name: str,
                       moved: list) -> None:
    """Write the tensors' bytes to ``data_tmp`` (aligned) and point them there; ``moved`` records
    (tensor, bytes, had data_location) so the caller can put the model back as it was."""
    try:
        with open(data_tmp, "wb") as f:
            offset = 0
            for t in tensors:
                pad = -offset % EXTERNAL_DATA_ALIGNMENT
                if pad:
                    _write_bytes(f, b"\0" * pad)
                    offset += pad
                raw = t.raw_data
                _write_bytes(f, raw)
                had_location = t.HasField("data_location")
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                moved.append((t, raw, had_location))
                offset += len(raw)
    except OSError as e:
        raise _write_error(data_path, e) from None


def _commit_pair(data_tmp: str | None, data_path: str, model_tmp: str, path: str) -> None:
    """Both files are complete: rename data, then model; on failure put the old data back."""
    if data_tmp is not None:
        _prepare_commit(data_tmp, data_path)
    _prepare_commit(model_tmp, path)
    folder = os.path.dirname(os.path.abspath(path))
    backup: str | None = None
    try:
        if data_tmp is not None:
            if os.path.lexists(data_path):
                backup = _make_temp(data_path)
                try:
                    os.replace(data_path, backup)
                except OSError as e:
                    _remove_quietly(backup)
                    backup = None
                    raise _not_writable(data_path, folder, e) from None
            try:
                os.replace(data_tmp, data_path)
            except OSError as e:
                raise _not_writable(data_path, folder, e) from None
        try:
            os.replace(model_tmp, path)
        except OSError as e:
            raise _not_writable(path, folder, e) from None
        _sync_folder(folder)
        if backup is not None:
            _remove_quietly(backup)
            backup = None
    finally:
        if backup is not None:  # the model could not be put in place: restore the old data
            try:
                os.replace(backup, data_path)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# summary


def _type_summary(type_proto: onnx.TypeProto) -> tuple[str, list[int | str | None] | None]:
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tt = getattr(type_proto, kind)
        name = dtype_name(tt.elem_type) if tt.elem_type else "unknown"
        if kind == "sparse_tensor_type":
            name = f"sparse<{name}>"
        if not tt.HasField("shape"):
            return name, None
        shape: list[int | str | None] = []
        for dim in tt.shape.dim:
            which = dim.WhichOneof("value")
            if which == "dim_value":
                shape.append(dim.dim_value)
            else:
                shape.append(dim.dim_param if which == "dim_param" else None)
        return name, shape
    if kind == "sequence_type":
        return f"sequence<{_type_summary(type_proto.sequence_type.elem_type)[0]}>", None
    if kind == "optional_type":
        return f"optional<{_type_summary(type_proto.optional_type.elem_type)[0]}>", None
    if kind == "map_type":
        mt = type_proto.map_type
        return f"map<{dtype_name(mt.key_type)},{_type_summary(mt.value_type)[0]}>", None
    return "unknown", None


def _tensor_bytes(tensor: TensorProto) -> int:
    expected = _expected_nbytes(tensor)
    if expected is not None:
        return expected
    return sum(len(s) for s in tensor.string_data)  # strings: their bytes


def _domain(domain: str) -> str:
    return domain or "ai.onnx"


def model_summary(model: ModelProto) -> dict[str, Any]:
    """What ``shiftc inspect`` shows: ops, parameters, bytes by dtype, inputs/outputs, opsets.

    The result is JSON-serializable::

        {"ir_version": 10, "producer_name": "pytorch", "producer_version": "2.13.0",
         "opset_imports": {"ai.onnx": 17},
         "num_nodes": 2, "ops": {"ai.onnx": {"MatMul": 1, "Relu": 1}},
         "num_parameters": 12, "parameter_bytes": 48, "bytes_by_dtype": {"float32": 48},
         "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
         "outputs": [...]}

    Nodes of subgraphs (If/Loop/Scan bodies) are counted too. Parameters are the elements of
    initializers (sparse ones: their stored values) and of Constant nodes' values; bytes are
    computed from shapes and dtypes (packed for sub-byte types, actual length for strings),
    so the summary is the same whether external data is loaded or not. Graph inputs that are
    also initializers (old exporters list them) are not listed as inputs. Shapes list ints,
    strings for symbolic dims and None for unknown dims; a shape of None means unknown rank.
    """
    graph = model.graph
    tally = _Tally()
    tally.walk(graph)
    initializer_names = {t.name for t in graph.initializer} | {sp.values.name for sp in graph.sparse_initializer}

    def value_infos(values, skip=frozenset()) -> list[dict[str, Any]]:
        out = []
        for vi in values:
            if vi.name not in skip:
                dtype, shape = _type_summary(vi.type)
                out.append({"name": vi.name, "dtype": dtype, "shape": shape})
        return out

    return {
        "ir_version": model.ir_version,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "opset_imports": {_domain(o.domain): o.version for o in model.opset_import},
        "num_nodes": tally.nodes,
        "ops": {d: dict(sorted(c.items())) for d, c in sorted(tally.ops.items())},
        "num_parameters": tally.params,
        "parameter_bytes": sum(tally.bytes_by_dtype.values()),
        "bytes_by_dtype": dict(sorted(tally.bytes_by_dtype.items())),
        "inputs": value_infos(graph.input, initializer_names),
        "outputs": value_infos(graph.output),
    }


# a Constant node's scalar/list attributes: (dtype, element count, bytes)
_CONSTANT_ATTRS = {
    "value_float": lambda a: ("float32", 1, 4),
    "value_floats": lambda a: ("float32", len(a.floats), 4 * len(a.floats)),
    "value_int": lambda a: ("int64", 1, 8),
    "value_ints": lambda a: ("int64", len(a.ints), 8 * len(a.ints)),
    "value_string": lambda a: ("string", 1, len(a.s)),
    "value_strings": lambda a: ("string", len(a.strings), sum(len(s) for s in a.strings)),
}


class _Tally:
    """Nodes per op, parameters and bytes per dtype of a graph and its subgraphs (model_summary)."""

    def __init__(self):
        self.ops: dict[str, dict[str, int]] = {}
        self.bytes_by_dtype: dict[str, int] = {}
        self.nodes = self.params = 0

    def add(self, dtype: str, n: int, nbytes: int) -> None:
        self.params += n
        self.bytes_by_dtype[dtype] = self.bytes_by_dtype.get(dtype, 0) + nbytes

    def add_tensor(self, t: TensorProto) -> None:
        self.add(dtype_name(t.data_type), _numel(t.dims), _tensor_bytes(t))

    def constant(self, attr) -> None:
        if attr.name == "value" and attr.HasField("t"):
            self.add_tensor(attr.t)
        elif attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
            self.add_tensor(attr.sparse_tensor.values)
        elif attr.name in _CONSTANT_ATTRS:
            self.add(*_CONSTANT_ATTRS[attr.name](attr))

    def walk(self, graph: GraphProto) -> None:
        for t in graph.initializer:
            self.add_tensor(t)
        for sp in graph.sparse_initializer:
            self.add_tensor(sp.values)
        for node in graph.node:
            self.nodes += 1
            by_op = self.ops.setdefault(_domain(node.domain), {})
            by_op[node.op_type] = by_op.get(node.op_type, 0) + 1
            is_constant = node.op_type == "Constant" and _domain(node.domain) == "ai.onnx"
            for attr in node.attribute:
                if is_constant:
                    self.constant(attr)
                if attr.HasField("g"):
                    self.walk(attr.g)
                for g in attr.graphs:
                    self.walk(g)

