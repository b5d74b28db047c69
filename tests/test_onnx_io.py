"""Tests of shiftc.frontend.onnx_io: safe loading, atomic saving, model summary."""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from shiftc.errors import BadInputError, UsageError
from shiftc.frontend import onnx_io
from shiftc.frontend.onnx_io import atomic_output, load_model, model_summary, save_model

# Loading and saving must not change a single weight, so ORT before and after should agree to
# float rounding at most.
ORT_RTOL = 1e-6
ORT_ATOL = 1e-6

HIDDEN = 64  # 64x64 float32 = 16 KiB: above the 1 KiB threshold for external data


def _mlp_model(seed: int = 0) -> onnx.ModelProto:
    """x[batch,64] -> MatMul(W) -> Add(b) -> Relu -> y."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    b = rng.standard_normal((HIDDEN,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
            helper.make_node("Relu", ["hb"], ["y"], name="relu"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run_ort(model_or_path, x: np.ndarray) -> np.ndarray:
    if isinstance(model_or_path, onnx.ModelProto):
        src = model_or_path.SerializeToString()
    else:
        src = str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _input(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, HIDDEN)).astype(np.float32)


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _bad(path, **kwargs) -> str:
    """load_model(path) must raise BadInputError naming the file; return the message."""
    with pytest.raises(BadInputError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert info.value.exit_code == 3
    return message


# --------------------------------------------------------------------------------------------
# round trips


def test_round_trip_inline(tmp_path):
    model = _mlp_model()
    x = _input()
    expected = _run_ort(model, x)
    path = tmp_path / "mlp.onnx"
    save_model(model, path)
    assert _listing(tmp_path) == ["mlp.onnx"]
    loaded = load_model(path)
    assert isinstance(loaded, onnx.ModelProto)
    np.testing.assert_allclose(_run_ort(loaded, x), expected, rtol=ORT_RTOL, atol=ORT_ATOL)
    np.testing.assert_allclose(_run_ort(path, x), expected, rtol=ORT_RTOL, atol=ORT_ATOL)
    assert loaded.SerializeToString() == model.SerializeToString()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~onnx_io._umask()


def test_round_trip_external_data(tmp_path):
    model = _mlp_model()
    before = model.SerializeToString()
    x = _input()
    expected = _run_ort(model, x)
    path = tmp_path / "sub" / "mlp.onnx"  # parent folder is created
    save_model(model, path, external_data=True)
    assert model.SerializeToString() == before  # the caller's model is left as it was
    assert _listing(path.parent) == ["mlp.onnx", "mlp.onnx.data"]
    assert os.path.getsize(path) < 2048  # the weights are no longer inline
    assert os.path.getsize(path.parent / "mlp.onnx.data") >= HIDDEN * HIDDEN * 4

    raw = onnx.load(str(path), load_external_data=False)
    w = next(t for t in raw.graph.initializer if t.name == "W")
    assert onnx_io._is_external(w)
    assert {e.key: e.value for e in w.external_data}["location"] == "mlp.onnx.data"

    loaded = load_model(path)
    assert not any(onnx_io._is_external(t) for t in loaded.graph.initializer)
    np.testing.assert_allclose(_run_ort(loaded, x), expected, rtol=ORT_RTOL, atol=ORT_ATOL)
    # ORT reads shiftc's external data layout by itself as well
    np.testing.assert_allclose(_run_ort(path, x), expected, rtol=ORT_RTOL, atol=ORT_ATOL)
    for a, b in zip(model.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))

    unloaded = load_model(path, load_external_data=False)
    assert onnx_io._is_external(next(t for t in unloaded.graph.initializer if t.name == "W"))
    assert model_summary(unloaded) == model_summary(loaded) == model_summary(model)


def test_external_data_through_symlink_inside_folder_is_accepted(tmp_path):
    save_model(_mlp_model(), tmp_path / "m.onnx", external_data=True)
    os.rename(tmp_path / "m.onnx.data", tmp_path / "real.data")
    os.symlink("real.data", tmp_path / "m.onnx.data")
    loaded = load_model(tmp_path / "m.onnx")
    np.testing.assert_allclose(_run_ort(loaded, _input()), _run_ort(_mlp_model(), _input()),
                               rtol=ORT_RTOL, atol=ORT_ATOL)


def test_external_data_in_subfolder_is_accepted(tmp_path):
    save_model(_mlp_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "weights").mkdir()
    os.rename(tmp_path / "m.onnx.data", tmp_path / "weights" / "m.bin")
    _rewrite_location(tmp_path / "m.onnx", "./weights/m.bin")
    load_model(tmp_path / "m.onnx")


def test_external_data_false_keeps_weights_inline_and_resave_overwrites(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(_mlp_model(0), path, external_data=True)
    save_model(_mlp_model(1), path, external_data=True)  # overwrite both files
    loaded = load_model(path)
    assert loaded.SerializeToString() == _mlp_model(1).SerializeToString()
    save_model(_mlp_model(2), path, external_data=False)
    assert load_model(path).SerializeToString() == _mlp_model(2).SerializeToString()


def test_save_refuses_model_with_unloaded_external_data(tmp_path):
    save_model(_mlp_model(), tmp_path / "m.onnx", external_data=True)
    unloaded = load_model(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(UsageError, match="external data"):
        save_model(unloaded, tmp_path / "other" / "m.onnx")
    assert not (tmp_path / "other" / "m.onnx").exists()


# --------------------------------------------------------------------------------------------
# malformed model files


def test_missing_file(tmp_path):
    assert "no such file" in _bad(tmp_path / "nope.onnx")


def test_directory(tmp_path):
    assert "directory" in _bad(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "empty" in _bad(path)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("size", [1, 7, 100, 5000])
def test_random_bytes(tmp_path, seed, size):
    path = tmp_path / "random.onnx"
    path.write_bytes(random.Random(seed * 1000 + size).randbytes(size))
    _bad(path)


def test_truncated_at_every_length(tmp_path):
    data = _small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    for length in range(1, len(data)):
        path.write_bytes(data[:length])
        _bad(path)


def test_truncated_large_model(tmp_path):
    data = _mlp_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    for length in [1, 2, 10, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1]:
        path.write_bytes(data[:length])
        _bad(path)


def test_checker_failure_names_file_and_problem(tmp_path):
    model = _mlp_model()
    model.graph.node[2].op_type = "NoSuchOp"
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    message = _bad(path)
    assert "NoSuchOp" in message and "\n" not in message


def test_ir_version_missing_or_too_new(tmp_path):
    path = tmp_path / "m.onnx"
    model = _mlp_model()
    model.ClearField("ir_version")
    path.write_bytes(model.SerializeToString())
    assert "ir_version" in _bad(path)
    model.ir_version = onnx.IR_VERSION + 1
    path.write_bytes(model.SerializeToString())
    assert "newer" in _bad(path)


def test_invalid_utf8_name(tmp_path):
    data = _mlp_model().SerializeToString()
    assert data.count(b"matmul") == 1
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(b"matmul", b"\xff\xfetmul"))
    assert "UTF-8" in _bad(path)


def test_over_2gib_needs_external_data(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31 + 16)  # sparse: costs no disk
    assert "external data" in _bad(path)


# --------------------------------------------------------------------------------------------
# unsafe or broken external data


def _rewrite_location(model_path, location: str, tensor: str = "W") -> None:
    model = onnx.load(str(model_path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == tensor)
    for entry in t.external_data:
        if entry.key == "location":
            entry.value = location
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())


@pytest.fixture
def ext_model(tmp_path):
    """A model with external data in tmp_path/model/, and a secret file beside the folder."""
    folder = tmp_path / "model"
    save_model(_mlp_model(), folder / "m.onnx", external_data=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * (1 << 20))  # long enough for any offset/length in the model
    return folder / "m.onnx", secret


@pytest.fixture
def no_reads_of(monkeypatch):
    """Record every path opened; the test then asserts the secret was never opened."""
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return opened


def _assert_tensor_error(path, *needles) -> str:
    message = _bad(path)
    assert "tensor 'W'" in message
    for needle in needles:
        assert needle in message
    return message


def test_read_spy_sees_data_file_of_valid_model(ext_model, no_reads_of):
    path, _ = ext_model
    load_model(path)
    assert str((path.parent / "m.onnx.data").resolve()) in no_reads_of


def test_location_with_dotdot(ext_model, no_reads_of):
    path, secret = ext_model
    _rewrite_location(path, "../secret.bin")
    message = _assert_tensor_error(path, "'../secret.bin'", "path traversal")
    assert str(secret.resolve()) not in no_reads_of
    assert "'..'" in message


def test_location_with_dotdot_in_the_middle_and_backslashes(ext_model):
    path, _ = ext_model
    for location in ["sub/../../secret.bin", "..\\secret.bin", "./..//secret.bin"]:
        _rewrite_location(path, location)
        _assert_tensor_error(path, "path traversal")


def test_absolute_location(ext_model, no_reads_of):
    path, secret = ext_model
    _rewrite_location(path, str(secret))
    _assert_tensor_error(path, str(secret), "absolute")
    assert str(secret.resolve()) not in no_reads_of


def test_symlink_pointing_outside(ext_model, no_reads_of):
    path, secret = ext_model
    os.symlink(secret, path.parent / "link.bin")
    _rewrite_location(path, "link.bin")
    _assert_tensor_error(path, "'link.bin'", "symbolic link", "path traversal")
    assert str(secret.resolve()) not in no_reads_of


def test_symlinked_subfolder_pointing_outside(ext_model, no_reads_of):
    path, secret = ext_model
    os.symlink(secret.parent, path.parent / "up")
    _rewrite_location(path, "up/secret.bin")
    _assert_tensor_error(path, "path traversal")
    assert str(secret.resolve()) not in no_reads_of


def test_missing_data_file(ext_model):
    path, _ = ext_model
    os.unlink(path.parent / "m.onnx.data")
    _assert_tensor_error(path, "missing", "m.onnx.data")


def test_data_file_too_short(ext_model):
    path, _ = ext_model
    data = path.parent / "m.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(100)
    _assert_tensor_error(path, "too short")


def test_bad_offset_and_length(ext_model):
    path, _ = ext_model
    model = onnx.load(str(path), load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "W")
    entries = {e.key: e for e in w.external_data}
    for key, value, needle in [("offset", "-4", "offset"), ("offset", "abc", "offset"),
                               ("length", "12", "needs")]:
        original = entries[key].value
        entries[key].value = value
        path.write_bytes(model.SerializeToString())
        _assert_tensor_error(path, needle)
        entries[key].value = original


def test_data_location_is_a_directory(ext_model):
    path, _ = ext_model
    (path.parent / "adir").mkdir()
    _rewrite_location(path, "adir")
    _assert_tensor_error(path, "not a regular file")


def test_validation_happens_with_load_external_data_false(ext_model):
    path, _ = ext_model
    _rewrite_location(path, "../secret.bin")
    _bad(path, load_external_data=False)


# --------------------------------------------------------------------------------------------
# atomic writes


def _break_writes(monkeypatch, exc: BaseException, *, after_calls: int = 0):
    """Make onnx_io._write_bytes write half of its data, then raise ``exc``."""
    real = onnx_io._write_bytes
    calls = {"n": 0}

    def broken(f, data):
        calls["n"] += 1
        if calls["n"] <= after_calls:
            return real(f, data)
        real(f, memoryview(data)[: len(data) // 2])
        raise exc

    monkeypatch.setattr(onnx_io, "_write_bytes", broken)


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_nothing_new(tmp_path, monkeypatch, external):
    path = tmp_path / "m.onnx"
    _break_writes(monkeypatch, RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(_mlp_model(), path, external_data=external)
    assert _listing(tmp_path) == []


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old contents")
    _break_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(BadInputError) as info:
        save_model(_mlp_model(), path)
    assert str(path) in str(info.value)
    assert _listing(tmp_path) == ["m.onnx"]
    assert path.read_bytes() == b"old contents"


@pytest.mark.parametrize("after_calls", [0, 1], ids=["in-data-file", "in-model-file"])
def test_failed_external_save_keeps_existing_model_and_data(tmp_path, monkeypatch, after_calls):
    path = tmp_path / "m.onnx"
    save_model(_mlp_model(0), path, external_data=True)
    old = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    new_model = _mlp_model(1)
    before = new_model.SerializeToString()
    # two writes: W's data (b, 256 bytes, stays inline), then the model
    _break_writes(monkeypatch, RuntimeError("boom"), after_calls=after_calls)
    with pytest.raises(RuntimeError, match="boom"):
        save_model(new_model, path, external_data=True)
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == old
    assert new_model.SerializeToString() == before  # weights put back into the caller's model
    np.testing.assert_allclose(_run_ort(load_model(path), _input()),
                               _run_ort(_mlp_model(0), _input()), rtol=ORT_RTOL, atol=ORT_ATOL)


def test_failed_model_rename_restores_old_data(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    save_model(_mlp_model(0), path, external_data=True)
    old = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.fspath(dst) == str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(BadInputError):
        save_model(_mlp_model(1), path, external_data=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == old
    load_model(path)


def test_atomic_output_success_and_failure(tmp_path):
    target = tmp_path / "out" / "lib.so"
    with atomic_output(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent)
        assert tmp.endswith(".so") and os.path.exists(tmp)
        with open(tmp, "w") as f:
            f.write("v1")
    assert target.read_text() == "v1"
    assert _listing(target.parent) == ["lib.so"]

    with pytest.raises(ValueError, match="writer failed"):
        with atomic_output(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise ValueError("writer failed")
    assert target.read_text() == "v1"
    assert _listing(target.parent) == ["lib.so"]


def test_atomic_output_keeps_existing_mode(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    with atomic_output(target) as tmp:
        with open(tmp, "w") as f:
            f.write('{"a": 1}')
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = blocker / "m.onnx"  # its "folder" is a regular file
    with pytest.raises(BadInputError) as info:
        save_model(_mlp_model(), path)
    assert str(path) in str(info.value) and "not writable" in str(info.value)
    with pytest.raises(BadInputError):
        with atomic_output(path):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        with pytest.raises(BadInputError, match="not writable"):
            save_model(_mlp_model(), folder / "m.onnx")
    finally:
        os.chmod(folder, 0o700)


def test_output_path_is_a_directory(tmp_path):
    with pytest.raises(BadInputError, match="directory"):
        save_model(_mlp_model(), tmp_path)


# --------------------------------------------------------------------------------------------
# model_summary


def _small_model() -> onnx.ModelProto:
    """MatMul(x, W) + b -> Relu -> Reshape(shape from a Constant) -> out, plus a Constant float."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.ones(3, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("Constant", [], ["shape"],
                             value=numpy_helper.from_array(np.array([-1, 3], np.int64), "shape_c")),
            helper.make_node("Reshape", ["r", "shape"], ["out"]),
            helper.make_node("Constant", [], ["alpha"], value_float=0.5),
            helper.make_node("Mul", ["out", "alpha"], ["scaled"]),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="shiftc-test", producer_version="0.1")
    model.ir_version = 8
    return model


def test_model_summary_exact():
    model = _small_model()
    model.graph.output[1].type.tensor_type.ClearField("shape")  # unknown rank
    summary = model_summary(model)
    assert summary == {
        "ir_version": 8,
        "producer_name": "shiftc-test",
        "producer_version": "0.1",
        "opset_imports": {"ai.onnx": 17},
        "num_nodes": 7,
        "ops": {
            "ai.onnx": {"Add": 1, "Constant": 2, "MatMul": 1, "Mul": 1, "Relu": 1, "Reshape": 1}
        },
        # W: 12, b: 3, shape constant: 2, alpha: 1
        "num_parameters": 18,
        "parameter_bytes": 12 * 4 + 3 * 4 + 2 * 8 + 4,
        "bytes_by_dtype": {"float32": 64, "int64": 16},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
        "outputs": [
            {"name": "out", "dtype": "float32", "shape": [None, 3]},
            {"name": "scaled", "dtype": "float32", "shape": None},
        ],
    }
    json.dumps(summary)


def test_model_summary_skips_initializer_inputs_and_counts_subgraphs():
    model = _small_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros(5, np.float16), "z")],
    )
    model.graph.node.append(helper.make_node("If", ["cond"], ["o"], then_branch=then_branch,
                                             else_branch=then_branch, domain="com.example"))
    summary = model_summary(model)
    assert [i["name"] for i in summary["inputs"]] == ["x"]
    assert summary["ops"]["com.example"] == {"If": 1}
    assert summary["ops"]["ai.onnx"]["Identity"] == 2
    assert summary["num_nodes"] == 10
    assert summary["bytes_by_dtype"]["float16"] == 2 * 5 * 2
    assert summary["num_parameters"] == 18 + 10


def test_model_summary_after_load(tmp_path):
    path = tmp_path / "small.onnx"
    save_model(_small_model(), path)
    assert model_summary(load_model(path)) == model_summary(_small_model())


# --------------------------------------------------------------------------------------------
# property-based: corrupted bytes never escape as anything but BadInputError


def _fuzz_base() -> onnx.ModelProto:
    """A model with a subgraph, a Constant and attributes, to give mutations more to hit."""
    model = _small_model()
    model.graph.output[1].type.tensor_type.shape.dim[0].ClearField("dim_param")  # unknown dim
    branch = helper.make_graph([helper.make_node("Identity", ["scaled"], ["t"])], "br", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    true = numpy_helper.from_array(np.array(True))
    model.graph.node.append(helper.make_node("Constant", [], ["cond"], value=true))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["o"], then_branch=branch, else_branch=branch)
    )
    model.graph.output.append(helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 3]))
    onnx.checker.check_model(model)
    return model


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        if not buf:
            break
        i = m[1] % len(buf)
        if m[0] == "flip":
            buf[i] ^= m[2]
        elif m[0] == "truncate":
            del buf[i:]
        elif m[0] == "insert":
            buf[i:i] = m[2]
        else:
            del buf[i:i + m[2]]
    return bytes(buf)


def _load_or_bad_input(path) -> None:
    try:
        model = load_model(path)
    except BadInputError as e:
        assert str(path) in str(e)
        return
    assert isinstance(model, onnx.ModelProto)
    json.dumps(model_summary(model))  # what load_model accepts, the rest of shiftc can read


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    save_model(_mlp_model(), folder / "ext.onnx", external_data=True)
    (folder.parent / "outside.bin").write_bytes(b"o" * (1 << 16))
    return folder


_FUZZ_SETTINGS = settings(max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ_SETTINGS
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_corrupted_bytes_inline_model(fuzz_dir, mutations):
    path = fuzz_dir / "inline.onnx"
    path.write_bytes(_mutate(_fuzz_base().SerializeToString(), mutations))
    _load_or_bad_input(path)


@_FUZZ_SETTINGS
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_corrupted_bytes_external_data_model(fuzz_dir, mutations):
    original = (fuzz_dir / "ext.onnx").read_bytes()
    path = fuzz_dir / "ext-mutated.onnx"
    path.write_bytes(_mutate(original, mutations))
    # the data file is m.onnx.data of "ext.onnx"; mutations of the location can point anywhere
    _load_or_bad_input(path)
