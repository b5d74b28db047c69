"""The C++ runtime (csrc/runtime) and its example app shiftc_run (csrc/examples), against the
Python runtime on the same model libraries and inputs.

The project is configured and built once per session with plain CMake (the C++ runtime is OFF
under scikit-build-core). shiftc_run's ``dump`` mode reads inputs from an SHT1 tensor file and
writes every output to another (format in csrc/examples/shiftc_run.cc), so outputs are compared
element by element.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_close, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# C++ and Python call the same library through the same TVM runtime functions, so fp32 outputs
# are expected to be bit-identical; the tolerance only bounds what a test would accept.
RTOL_SAME_LIBRARY = 1e-6
ATOL_SAME_LIBRARY = 1e-6

# shiftc_run/valgrind runs are short; a hang should fail, not block the suite.
RUN_TIMEOUT = 300


# -- SHT1 tensor files --------------------------------------------------------------------------

def write_sht1(path, tensors: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(b"SHT1" + struct.pack("<I", len(tensors)))
        for name, a in tensors.items():
            a = np.ascontiguousarray(a)
            for s in (name.encode(), str(a.dtype).encode()):
                f.write(struct.pack("<I", len(s)) + s)
            f.write(struct.pack(f"<I{a.ndim}qQ", a.ndim, *a.shape, a.nbytes) + a.tobytes())


def read_sht1(path) -> dict[str, np.ndarray]:
    buf = open(path, "rb").read()
    assert buf[:4] == b"SHT1", f"{path} is not an SHT1 file"
    (count,) = struct.unpack_from("<I", buf, 4)
    pos, out = 8, {}

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return values

    def take_str():
        nonlocal pos
        (n,) = take("<I")
        pos += n
        return buf[pos - n:pos].decode()

    for _ in range(count):
        name, dtype = take_str(), take_str()
        (ndim,) = take("<I")
        shape = take(f"<{ndim}q")
        (nbytes,) = take("<Q")
        out[name] = np.frombuffer(buf[pos:pos + nbytes], dtype=dtype).reshape(shape)
        pos += nbytes
    return out


# -- build + models -----------------------------------------------------------------------------

def _cmake(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["cmake", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert proc.returncode == 0, f"cmake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory):
    """Configure + build libshiftc_runtime and shiftc_run (plain CMake, -j2); returns the build dir."""
    require(shutil.which("cmake") is not None, "cmake not found")
    require(any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")), "no C++ compiler found")
    build = tmp_path_factory.mktemp("cpp_build")
    _cmake("-S", ROOT, "-B", str(build), *_generator(), f"-DPython_EXECUTABLE={sys.executable}",
           "-DSHIFTC_BUILD_RUNTIME=ON", "-DSHIFTC_BUILD_PYTHON=OFF")
    _cmake("--build", str(build), "-j2")
    return build


@pytest.fixture(scope="session")
def app(cpp_build):
    path = cpp_build / "csrc" / "examples" / "shiftc_run"
    assert path.is_file()
    return str(path)


def _build_model(tmp_path_factory, factory: str, target: str = "host") -> str:
    import shiftc

    d = tmp_path_factory.mktemp(factory.replace(":", "_"))
    onnx_path, lib = str(d / "model.onnx"), str(d / f"model-{target}.so")
    shiftc.export(f"tests.factories:{factory}", onnx_path)
    shiftc.compile(onnx_path, lib, target=target)
    return lib


@pytest.fixture(scope="session")
def mlp_lib(tmp_path_factory):
    return _build_model(tmp_path_factory, "mlp")


@pytest.fixture(scope="session")
def cnn_lib(tmp_path_factory):
    return _build_model(tmp_path_factory, "small_cnn")


def run_app(*args, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}"
    return proc


def dump(app, lib, feeds, tmp_path, tag="run") -> dict[str, np.ndarray]:
    inp, out = tmp_path / f"{tag}.in.sht", tmp_path / f"{tag}.out.sht"
    write_sht1(inp, feeds)
    run_app(app, "dump", lib, inp, out)
    return read_sht1(out)


def compare(cpp: dict, py: dict, what: str) -> float:
    assert list(cpp) == list(py), f"{what}: outputs {list(cpp)} vs {list(py)}"
    worst = 0.0
    for name in py:
        assert cpp[name].dtype == py[name].dtype and cpp[name].shape == py[name].shape, f"{what}: {name}"
        assert_close(cpp[name], py[name], rtol=RTOL_SAME_LIBRARY, atol=ATOL_SAME_LIBRARY, what=f"{what}: {name}")
        if py[name].size:
            worst = max(worst, float(np.max(np.abs(cpp[name].astype(np.float64) - py[name]))))
    print(f"\n[cpp-vs-python] {what}: max abs error {worst:.3g}")
    return worst


# -- outputs: C++ vs Python ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_dump_matches_python(which, request, app, tmp_path):
    import shiftc

    lib = request.getfixturevalue(f"{which}_lib")
    model = shiftc.load(lib)
    (spec,) = model.inputs
    shape = [3 if isinstance(d, str) else d for d in spec["shape"]]  # batch 3: not the export batch
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    compare(dump(app, lib, {spec["name"]: x}, tmp_path), model.run({spec["name"]: x}), which)


def test_info_lists_signature(app, mlp_lib):
    out = run_app(app, "info", mlp_lib).stdout
    assert "task custom" in out
    assert re.search(r"input\s+input\s+float32\s+\[batch, 32\]", out), out
    assert re.search(r"output\s+output\s+float32\s+\[batch, 10\]", out), out


def test_lm_dump_two_steps_matches_python(app, tiny_llama, tmp_path):
    """Prefill + one cached step through Model::SetInput/Run: logits and presents identical."""
    import shiftc

    _, lib = tiny_llama
    model = shiftc.load(lib)
    d = model.meta["decoder"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, d["num_kv_heads"], 0, d["head_dim"]), np.float32)
            for i in range(d["num_layers"]) for kv in ("key", "value")}
    length = 0
    for step, ids in enumerate([[1, 400, 2000, 31000], [77]]):
        s = len(ids)
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, length + s), np.int64),
                 "position_ids": np.arange(length, length + s, dtype=np.int64)[None], **past}
        cpp = dump(app, lib, feeds, tmp_path, tag=f"step{step}")
        compare(cpp, model.run(feeds), f"tiny LM step {step}")
        past = {f"past_key_values.{k[len('present.'):]}": v for k, v in cpp.items() if k.startswith("present.")}
        length += s


def python_greedy(lib: str, prompt: list[int], steps: int) -> list[int]:
    """The loop of shiftc_run's lm mode, on the Python runtime's lm_session."""
    import shiftc

    model = shiftc.load(lib)
    session = model.lm_session()
    eos = set(model.meta["decoder"].get("eos_token_ids", []))
    logits = session.step(np.array(prompt), last_only=True)[0]
    out = []
    for i in range(steps):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        if nxt in eos or i + 1 == steps:
            break
        logits = session.step(np.array([nxt]), last_only=True)[0]
    return out


def test_lm_greedy_matches_python(app, tiny_llama):
    _, lib = tiny_llama
    prompt, steps = [1, 400, 2000, 31000, 77], 12
    proc = run_app(app, "lm", lib, "--tokens", ",".join(map(str, prompt)), "--steps", steps)
    m = re.search(r"^tokens:((?: \d+)*)$", proc.stdout, re.M)
    assert m, proc.stdout
    cpp = [int(t) for t in m.group(1).split()]
    assert cpp == python_greedy(lib, prompt, steps)
    assert re.search(r"[\d.]+ tokens/s", proc.stdout), proc.stdout
    print(f"\n[cpp-vs-python] tiny LM greedy: {len(cpp)} identical tokens {cpp}; {proc.stdout.splitlines()[-1]}")


@pytest.mark.slow
def test_classify_efficientnet_matches_python(app, tmp_path_factory, tmp_path):
    import shiftc

    lib = _build_model(tmp_path_factory, "efficientnet_lite0")
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    x.tofile(tmp_path / "image.f32")
    py = shiftc.load(lib).run({"pixel_values": x})
    compare(dump(app, lib, {"pixel_values": x}, tmp_path), py, "efficientnet-lite0")

    out = run_app(app, "classify", lib, tmp_path / "image.f32", "--top", 5).stdout
    rows = re.findall(r"class\s+(\d+)\s+logit\s+(-?[\d.]+)\s+prob\s+([\d.]+)", out)
    logits = py["logits"][0]
    assert [int(c) for c, _, _ in rows] == list(np.argsort(-logits, kind="stable")[:5]), out
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    for c, logit, prob in rows:
        assert abs(float(logit) - logits[int(c)]) < 1e-4 and abs(float(prob) - probs[int(c)]) < 1e-4


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("feeds, message", [
    ({"input": np.zeros((2, 32), np.float64)}, "input 'input' must be float32, got float64"),
    ({"input": np.zeros((2, 32, 1), np.float32)}, "input 'input' must have rank 2"),
    ({"input": np.zeros((2, 31), np.float32)}, "input 'input' dimension 1 must be 32, got 31"),
    ({"x": np.zeros((2, 32), np.float32)}, "unknown input 'x'; the model takes [input]"),
    ({}, "input 'input' was not set"),
])
def test_bad_inputs_rejected(app, mlp_lib, tmp_path, feeds, message):
    write_sht1(tmp_path / "in.sht", feeds)
    proc = run_app(app, "dump", mlp_lib, tmp_path / "in.sht", tmp_path / "out.sht", check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out.sht").exists()


def test_symbolic_dims_checked(app, tiny_llama, tmp_path):
    _, lib = tiny_llama
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")}
    ids, pos = np.array([[1, 2, 3]], np.int64), np.arange(3, dtype=np.int64)[None]
    for feeds, message in [
        ({"attention_mask": np.ones((2, 3), np.int64)}, "dimension 0 ('batch') is 2, but another input fixed 'batch' = 1"),
        ({"attention_mask": np.ones((1, 5), np.int64)}, "input 'attention_mask' dimension 1 must be past + seq = 3, got 5"),
    ]:
        write_sht1(tmp_path / "in.sht", {"input_ids": ids, "position_ids": pos, **past, **feeds})
        proc = run_app(app, "dump", lib, tmp_path / "in.sht", tmp_path / "out.sht", check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_library_errors(app, mlp_lib, tmp_path):
    not_elf = tmp_path / "text.so"
    not_elf.write_text("not a library")
    cases = [
        (["info", tmp_path / "missing.so"], "model library '" + str(tmp_path / "missing.so") + "' does not exist"),
        (["info", not_elf], "is not a loadable model library"),
        (["info", os.path.join(ROOT, "pyproject.toml")], "is not a model library (expected a .so"),
        (["lm", mlp_lib, "--tokens", "1,2"], "task is 'custom', not a causal LM"),
        (["classify", mlp_lib, not_elf], "needs 32 float32 values"),
    ]
    for args, message in cases:
        proc = run_app(app, *args, check=False)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert message in proc.stderr and proc.stderr.startswith("shiftc_run: error: "), proc.stderr
    libm = shutil.copy(next(p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/libm.so.6", "/lib64/libm.so.6")
                            if os.path.exists(p)), tmp_path / "libm.so") if sys.platform == "linux" else None
    if libm:
        proc = run_app(app, "info", libm, check=False)
        assert proc.returncode == 1 and "is not a shiftc model library" in proc.stderr, proc.stderr
    # A TVM Relax library that shiftc did not build: no embedded metadata.
    import tvm

    from shiftc.backend.importer import to_relax

    onnx_path = os.path.join(os.path.dirname(mlp_lib), "model.onnx")
    tvm.compile(to_relax(onnx_path_model(onnx_path), onnx_path), target="llvm").export_library(str(tmp_path / "plain.so"))
    proc = run_app(app, "info", tmp_path / "plain.so", check=False)
    assert proc.returncode == 1 and "is not a shiftc model library (no shiftc_metadata)" in proc.stderr, proc.stderr
    # A library for another device (the CUDA target compiles without a GPU or nvcc).
    import shiftc

    shiftc.compile(onnx_path, str(tmp_path / "cuda.so"), target="cuda")
    proc = run_app(app, "info", tmp_path / "cuda.so", check=False)
    assert proc.returncode == 1 and "is compiled for CUDA; this C++ runtime runs CPU model libraries only" in proc.stderr
    assert run_app(app, check=False).returncode == 2
    assert run_app(app, "lm", mlp_lib, "--steps", "x", check=False).returncode == 2


def onnx_path_model(path: str):
    from shiftc.frontend.onnx_io import load_model

    return load_model(path)


def test_ctest(cpp_build, mlp_lib, tiny_llama):
    require(shutil.which("ctest") is not None, "ctest not found")
    _cmake("-S", ROOT, "-B", str(cpp_build), f"-DSHIFTC_TEST_MODEL={mlp_lib}", f"-DSHIFTC_TEST_LM_MODEL={tiny_llama[1]}")
    proc = subprocess.run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"100% tests passed.* out of 4", proc.stdout), proc.stdout


# -- install + downstream find_package(shiftc) ----------------------------------------------------

DOWNSTREAM_CMAKE = """\
cmake_minimum_required(VERSION 3.16)
project(downstream LANGUAGES CXX)
find_package(shiftc 0.1 CONFIG REQUIRED)
add_executable(app main.cc)
target_link_libraries(app PRIVATE shiftc::runtime)
"""

DOWNSTREAM_MAIN = r"""
#include <shiftc/runtime.h>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  shiftc::Model model = shiftc::Model::Load(argv[1]);
  const shiftc::TensorInfo& in = model.inputs().at(0);
  std::printf("input %s %s rank %zu symbol %s\n", in.name.c_str(), in.dtype.c_str(), in.shape.size(), in.symbols[0].c_str());
  std::vector<float> x(2 * 32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i) - 0.3f;
  model.SetInput(in.name, x.data(), {2, 32});
  model.Run();
  shiftc::TensorView y = model.Output(0);
  std::printf("output %s [%lld, %lld]:", y.dtype.c_str(), (long long)y.shape[0], (long long)y.shape[1]);
  for (float v : model.OutputFloats(model.outputs()[0].name)) std::printf(" %.9g", v);
  std::printf("\n");
  try {
    model.SetInput("nope", x.data(), {2, 32});
  } catch (const shiftc::Error& e) {  // the exception type crosses the library boundary
    std::printf("caught: %s\n", e.what());
  }
  return 0;
}
"""


def test_install_and_find_package(cpp_build, mlp_lib, tmp_path):
    import shiftc

    prefix = tmp_path / "prefix"
    _cmake("--install", str(cpp_build), "--prefix", str(prefix))
    libdir = next(p.relative_to(prefix).parts[0] for p in prefix.glob("lib*/cmake/shiftc"))  # lib or lib64
    for f in ("include/shiftc/runtime.h", f"{libdir}/libshiftc_runtime.so", f"{libdir}/libtvm_runtime.so",
              f"{libdir}/libtvm_ffi.so", f"{libdir}/cmake/shiftc/shiftcConfig.cmake", "bin/shiftc_run",
              "share/shiftc/examples/shiftc_run.cc"):
        assert (prefix / f).exists(), f

    src, build = tmp_path / "downstream", tmp_path / "downstream-build"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(DOWNSTREAM_CMAKE)
    (src / "main.cc").write_text(DOWNSTREAM_MAIN)
    _cmake("-S", str(src), "-B", str(build), *_generator(), f"-DCMAKE_PREFIX_PATH={prefix}")
    _cmake("--build", str(build), "-j2")

    # The installed tree is self-contained: no wheel paths, no LD_LIBRARY_PATH.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = run_app(build / "app", mlp_lib, env=env).stdout
    assert "input input float32 rank 2 symbol batch" in out
    assert "caught: " in out and "unknown input 'nope'" in out
    values = np.array([float(v) for v in re.search(r"output float32 \[2, 10\]:(.*)", out).group(1).split()], np.float32)
    x = (0.01 * np.arange(64, dtype=np.float32) - 0.3).astype(np.float32).reshape(2, 32)
    expected = shiftc.load(mlp_lib).run({"input": x})["output"].ravel()
    assert_close(values, expected, rtol=RTOL_SAME_LIBRARY, atol=ATOL_SAME_LIBRARY, what="downstream app")
    assert "task custom" in run_app(prefix / "bin" / "shiftc_run", "info", mlp_lib, env=env).stdout


# -- memory checking ------------------------------------------------------------------------------

def test_valgrind_clean(app, tmp_path_factory, tiny_llama, tmp_path):
    """No invalid accesses and no definite leaks, on the MLP (dump) and the tiny LM (KV-cache
    decoding). Valgrind 3.19 cannot decode AVX-512, so these libraries target plain x86-64."""
    require(shutil.which("valgrind") is not None, "valgrind not found")
    import shiftc

    mlp = _build_model(tmp_path_factory, "mlp", target="x86-64")
    lm = str(tmp_path / "tiny-x86-64.so")
    shiftc.compile(tiny_llama[0], lm, target="x86-64")
    write_sht1(tmp_path / "in.sht", {"input": np.ones((2, 32), np.float32)})
    valgrind = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"]
    for want, args in ((0, ["dump", mlp, tmp_path / "in.sht", tmp_path / "out.sht"]),
                       (0, ["lm", lm, "--tokens", "1,2,3", "--steps", "3"]),
                       (1, ["dump", mlp, tmp_path / "missing.sht", tmp_path / "out.sht"])):  # an exception
        proc = run_app(*valgrind, app, *args, check=False)
        assert proc.returncode == want, f"valgrind {args}: exit {proc.returncode}\n{proc.stderr[-6000:]}"
        assert "ERROR SUMMARY: 0 errors" in proc.stderr and "definitely lost: 0 bytes" in proc.stderr, proc.stderr[-6000:]
