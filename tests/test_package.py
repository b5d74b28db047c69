"""``shiftc package --target aarch64`` (shiftc/targets/package.py): the board folder is built here,
its app run under ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` and compared with the host's Python
runtime on a library compiled for this machine, on the same inputs. Also the Deploy page
(docs/deploy.md): every command block of it is run here.

Packages are built once per module (qemu is slow); the cross-built runtime is cached in
~/.cache/shiftc/runtime, so only the first package of a fresh machine pays for CMake.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import require
from test_cpp_runtime import python_greedy, read_sht1, write_sht1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSROOT = "/usr/aarch64-linux-gnu"
QEMU = ["qemu-aarch64", "-L", SYSROOT]

# NEON here vs AVX-512 on the host: other vector widths, reduction orders and FMA contraction, so
# outputs agree to rounding, not bit for bit. Absolute errors on outputs of size ~1 (logits ~10).
ATOL_MLP = 1e-4
ATOL_LM_LOGITS = 1e-3  # and identical greedy tokens
ATOL_LM_KV = 1e-4  # present.* (the KV cache) before the final projection amplifies differences
ATOL_EFFNET_LOGITS = 1e-3  # and identical top-1
QEMU_TIMEOUT = 600


def tiny_classifier():
    """A small CNN on 224x224 images, standing in for an image classifier (module:factory)."""
    import torch

    from tests.factories import small_cnn

    model, _ = small_cnn()
    return {"model": model, "inputs": (torch.randn(1, 3, 224, 224),), "input_names": ["pixel_values"],
            "output_names": ["logits"], "task": "image-classification"}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_tools():
    require(shutil.which("aarch64-linux-gnu-g++") is not None,
            "aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
    require(shutil.which("qemu-aarch64") is not None and os.path.isdir(SYSROOT),
            "qemu-aarch64 or /usr/aarch64-linux-gnu missing (apt-get install qemu-user g++-aarch64-linux-gnu)")
    require(shutil.which("cmake") is not None, "cmake not found (apt-get install cmake)")


def _export_and_compile(tmp_path_factory, src: str, name: str) -> tuple[str, str]:
    """(onnx, host library) for a module:factory or HF folder."""
    import shiftc

    d = tmp_path_factory.mktemp(name)
    onnx_path, host_lib = str(d / f"{name}.onnx"), str(d / f"{name}-host.so")
    shiftc.export(src, onnx_path)
    shiftc.compile(onnx_path, host_lib)
    return onnx_path, host_lib


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return _export_and_compile(tmp_path_factory, "tests.factories:mlp", "mlp")


@pytest.fixture(scope="module")
def mlp_pkg(cross_tools, mlp, tmp_path_factory):
    import shiftc

    return shiftc.package(mlp[0], tmp_path_factory.mktemp("pkg") / "mlp-arm", target="aarch64")


@pytest.fixture(scope="module")
def lm_pkg(cross_tools, tiny_llama, tmp_path_factory):
    import shiftc

    return shiftc.package(tiny_llama[0], tmp_path_factory.mktemp("pkg") / "tiny-lm-arm", target="aarch64",
                          cpu="cortex-a76")


def on_board(pkg: str, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``./bin/shiftc_run ARGS`` in the package folder under qemu, as on the board: no
    LD_LIBRARY_PATH (the RUNPATH finds lib/)."""
    env = env or {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([*QEMU, "./bin/shiftc_run", *map(str, args)], cwd=pkg, capture_output=True, text=True,
                          timeout=QEMU_TIMEOUT, env=env)
    if check:
        assert proc.returncode == 0, f"shiftc_run {args} under qemu exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def board_dump(pkg: str, feeds: dict, tmp_path, tag: str = "run") -> dict:
    inp, out = tmp_path / f"{tag}.in.sht", tmp_path / f"{tag}.out.sht"
    write_sht1(inp, feeds)
    on_board(pkg, "dump", "model.so", inp, out)
    return read_sht1(out)


def max_abs_error(board: dict, host: dict, atol: float, what: str, atol_for=lambda name: None) -> float:
    """Largest |board - host| over all outputs, each under its tolerance; printed for the notes."""
    assert list(board) == list(host), f"{what}: outputs {list(board)} vs {list(host)}"
    worst = 0.0
    for name, ref in host.items():
        got = board[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {name} {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        limit = atol_for(name) or atol
        assert err <= limit, f"{what}: {name} max abs error {err:.3g} > {limit}"
        worst = max(worst, err)
    print(f"\n[qemu-vs-host] {what}: max abs error {worst:.3g}")
    return worst


def elf_info(path: str) -> str:
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    require(readelf is not None, "readelf not found (binutils)")
    return subprocess.run([readelf, "-h", "-d", path], capture_output=True, text=True, check=True).stdout


# -- the package --------------------------------------------------------------------------------


def test_package_layout(mlp_pkg):
    import importlib.metadata

    from shiftc.targets.package import MANIFEST

    d = mlp_pkg.path
    for f in ("model.so", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "lib/libshiftc_runtime.so", "bin/shiftc_run",
              "include/shiftc/runtime.h", "lib/cmake/shiftc/shiftcConfig.cmake", "README.md", MANIFEST):
        assert os.path.isfile(os.path.join(d, f)), f
    for f in ("model.so", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "lib/libshiftc_runtime.so", "bin/shiftc_run"):
        assert "AArch64" in elf_info(os.path.join(d, f)), f
    assert "Library runpath: [$ORIGIN/../lib]" in elf_info(os.path.join(d, "bin/shiftc_run"))
    assert "Library runpath: [$ORIGIN]" in elf_info(os.path.join(d, "lib/libshiftc_runtime.so"))

    r = mlp_pkg.to_json()
    versions = {dist: importlib.metadata.version(dist) for dist in ("apache-tvm", "apache-tvm-ffi")}
    assert r["versions"] == versions
    sizes = r["size_bytes"]
    runtime = sum(os.path.getsize(os.path.join(d, f)) for f in ("bin/shiftc_run", "lib/libtvm_runtime.so",
                                                                "lib/libtvm_ffi.so", "lib/libshiftc_runtime.so"))
    assert sizes == {"model": os.path.getsize(os.path.join(d, "model.so")), "runtime": runtime, "total": sizes["model"] + runtime}
    manifest = json.load(open(os.path.join(d, MANIFEST)))
    assert manifest["versions"] == versions and manifest["size_bytes"] == sizes and manifest["target"] == "aarch64"
    assert set(manifest["requires"]) == {"glibc", "glibcxx"}
    readme = open(os.path.join(d, "README.md")).read()
    assert "./bin/shiftc_run info model.so" in readme and "./bin/shiftc_run dump model.so" in readme
    assert "input  input" in readme and "[batch, 32]" in readme
    assert f"glibc {manifest['requires']['glibc']} or newer" in readme
    assert not [n for n in os.listdir(os.path.dirname(d)) if n.startswith(".")], "temporary folders left behind"
    print(f"\n[package] mlp: runtime {sizes['runtime'] / 1e6:.2f} MB + model {sizes['model'] / 1e6:.3f} MB")


def test_mlp_on_board_matches_host(mlp_pkg, mlp, tmp_path):
    import shiftc

    out = on_board(mlp_pkg.path, "info", "model.so").stdout
    assert re.search(r"input\s+input\s+float32\s+\[batch, 32\]", out), out
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    host = shiftc.load(mlp[1]).run({"input": x})
    max_abs_error(board_dump(mlp_pkg.path, {"input": x}, tmp_path), host, ATOL_MLP, "mlp")


def test_package_compiled_library_offline_cli(mlp_pkg, mlp, tmp_path):
    """An already cross-compiled .so, through the CLI, with the wheels from a folder (--wheels)."""
    from conftest import run_cli
    from shiftc.errors import EXIT_BAD_INPUT
    from shiftc.targets.package import cache_dir

    arm_so = tmp_path / "mlp-arm.so"
    shutil.copy(os.path.join(mlp_pkg.path, "model.so"), arm_so)
    out = tmp_path / "from-so"
    proc = run_cli("package", str(arm_so), "--target", "aarch64", "-o", str(out), "--json",
                   "--wheels", os.path.join(cache_dir(), "wheels"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["task"] == "custom" and r["size_bytes"]["model"] == arm_so.stat().st_size
    assert (out / "model.so").read_bytes() == arm_so.read_bytes()
    assert "[batch, 32]" in (out / "README.md").read_text()  # signature read from the library's bytes
    assert "task custom" in on_board(str(out), "info", "model.so").stdout

    proc = run_cli("package", mlp[1], "-o", str(tmp_path / "host-so"))  # a library for this machine
    assert proc.returncode == EXIT_BAD_INPUT and "shiftc package: error: " in proc.stderr
    assert "is a library for x86-64, not AArch64" in proc.stderr and not (tmp_path / "host-so").exists()


def test_errors_name_the_problem(mlp, mlp_pkg, tmp_path, monkeypatch):
    import shiftc
    from shiftc.errors import BadInputError, UsageError
    from shiftc.targets.package import ToolchainError

    out = tmp_path / "out"
    cases = [
        (dict(model=mlp[1]), BadInputError, "is a library for x86-64, not AArch64"),
        (dict(model=os.path.join(mlp_pkg.path, "model.so"), cpu="cortex-a53"), UsageError, "--cpu applies when compiling"),
        (dict(model=mlp[0], target="host"), UsageError, "builds for aarch64 only"),
        (dict(model=mlp[0], wheels=str(tmp_path)), ToolchainError, "pip download --no-deps --only-binary=:all: "
                                                                    "--platform manylinux_2_28_aarch64"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            shiftc.package(kwargs.pop("model"), out, **kwargs)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not a shiftc package"):
        shiftc.package(mlp[0], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    # No network: the download fails with the offline recipe (pip with an unreachable index).
    monkeypatch.delenv("SHIFTC_WHEELS", raising=False)
    monkeypatch.setenv("SHIFTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ToolchainError, match=r"needs network access to PyPI.*--wheels WHEELS"):
        shiftc.package(mlp[0], out)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no cross compiler, no cmake
    with pytest.raises(ToolchainError, match=re.escape("apt-get install g++-aarch64-linux-gnu")):
        shiftc.package(mlp[0], out)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary folders left behind"


def test_failure_leaves_no_package(mlp_pkg, tmp_path):
    """A model that fails to load after the runtime is assembled: no folder, no temporary left."""
    import shiftc
    from shiftc.errors import BadInputError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\x03not an onnx model")
    with pytest.raises(BadInputError):
        shiftc.package(bad, tmp_path / "bad-arm")
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx"]
    # An earlier package survives a failed rebuild into the same folder.
    keep = tmp_path / "keep"
    shutil.copytree(mlp_pkg.path, keep)
    with pytest.raises(BadInputError):
        shiftc.package(bad, keep)
    assert (keep / "model.so").read_bytes() == open(os.path.join(mlp_pkg.path, "model.so"), "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx", "keep"]


# -- causal LM: KV-cache decoding on the board ------------------------------------------------------


def test_lm_on_board_matches_host(lm_pkg, tiny_llama, tmp_path):
    import shiftc

    _, host_lib = tiny_llama
    assert lm_pkg.task == "causal-lm" and lm_pkg.cpu == "cortex-a76"
    readme = open(os.path.join(lm_pkg.path, "README.md")).read()
    assert "./bin/shiftc_run lm model.so --tokens" in readme

    # Prefill through dump: logits and the KV cache.
    model = shiftc.load(host_lib)
    d = model.meta["decoder"]
    ids = [1, 400, 2000, 31000, 77]
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None],
             **{f"past_key_values.{i}.{kv}": np.zeros((1, d["num_kv_heads"], 0, d["head_dim"]), np.float32)
                for i in range(d["num_layers"]) for kv in ("key", "value")}}
    max_abs_error(board_dump(lm_pkg.path, feeds, tmp_path), model.run(feeds), ATOL_LM_LOGITS, "tiny LM prefill",
                  atol_for=lambda name: ATOL_LM_KV if name.startswith("present.") else None)

    # Greedy decoding with the KV cache (lm mode): the same tokens as the host.
    steps = 12
    proc = on_board(lm_pkg.path, "lm", "model.so", "--tokens", ",".join(map(str, ids)), "--steps", steps)
    m = re.search(r"^tokens:((?: \d+)*)$", proc.stdout, re.M)
    assert m, proc.stdout
    board = [int(t) for t in m.group(1).split()]
    assert board == python_greedy(host_lib, ids, steps)
    print(f"\n[qemu-vs-host] tiny LM greedy: {len(board)} identical tokens; {proc.stdout.splitlines()[-1]}")


# -- shift-add (ai.shiftc::BcqMatMul and its C kernels, cross-compiled) --------------------------------


@pytest.mark.parametrize("scale_mode", ["pow2x2", "uniform"])
def test_shiftadd_mlp_on_board_matches_host(cross_tools, mlp, tmp_path, scale_mode):
    """A 2-bit shift-add MLP (BCQ, and a uniform grid with its compact float16 scales): the lut16
    kernels are cross-compiled into the aarch64 library and give the host's numbers under qemu,
    at a GEMV and a GEMM row count."""
    import shiftc
    import shiftc.api

    sa = str(tmp_path / "mlp_sa2.onnx")
    shiftc.api.compress(mlp[0], sa, bits=2, group=32, calib="none", scale_mode=scale_mode)
    host_lib = str(tmp_path / "mlp_sa2-host.so")
    shiftc.compile(sa, host_lib)
    pkg = shiftc.package(sa, tmp_path / "mlp-sa-arm", target="aarch64")
    host = shiftc.load(host_lib)
    for rows in (1, 9):
        x = np.random.default_rng(rows).standard_normal((rows, 32)).astype(np.float32)
        max_abs_error(board_dump(pkg.path, {"input": x}, tmp_path, tag=f"sa{rows}"), host.run({"input": x}), ATOL_MLP,
                      f"shift-add mlp, {rows} rows")


# -- EfficientNet-Lite0 (real weights) ---------------------------------------------------------------


@pytest.mark.slow
def test_efficientnet_on_board_matches_host(cross_tools, tmp_path_factory, tmp_path):
    import shiftc
    from shiftc.frontend.data import load_images

    onnx_path, host_lib = _export_and_compile(tmp_path_factory, "tests.factories:efficientnet_lite0", "effnet")
    pkg = shiftc.package(onnx_path, tmp_path / "effnet-arm")
    x = load_images(224)[0][:2]  # astronaut, chelsea
    host = shiftc.load(host_lib).run({"pixel_values": x})
    board = board_dump(pkg.path, {"pixel_values": x}, tmp_path)
    max_abs_error(board, host, ATOL_EFFNET_LOGITS, "efficientnet-lite0")
    assert list(board["logits"].argmax(-1)) == list(host["logits"].argmax(-1))

    x[:1].tofile(tmp_path / "image.f32")
    out = on_board(pkg.path, "classify", "model.so", tmp_path / "image.f32", "--top", 5).stdout
    top1 = re.search(r"^\s*1\. class\s+(\d+)", out, re.M)
    assert top1 and int(top1.group(1)) == int(host["logits"][0].argmax()), out
    s = pkg.to_json()["size_bytes"]
    print(f"\n[package] efficientnet-lite0: runtime {s['runtime'] / 1e6:.2f} MB + model {s['model'] / 1e6:.2f} MB "
          f"= {s['total'] / 1e6:.2f} MB")


# -- docs/deploy.md ----------------------------------------------------------------------------------

DOC = os.path.join(ROOT, "docs", "deploy.md")
_BLOCK = re.compile(r"(?:<!-- (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


def doc_blocks() -> list[tuple[str, str, str]]:
    """(mark, language, body) of every fenced block of the Deploy page, in order."""
    return [(m["mark"] or "", m["lang"], m["body"]) for m in _BLOCK.finditer(open(DOC).read())]


def test_deploy_page_commands(cross_tools, tiny_llama, tmp_path):
    """Runs every command block of docs/deploy.md in order, in a scratch copy of the checkout."""
    import shiftc

    require(shutil.which("ctest") is not None, "ctest not found")
    work = tmp_path / "checkout"
    work.mkdir()
    for top in ("CMakeLists.txt", "cmake", "csrc"):
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, top)) else shutil.copy)(os.path.join(ROOT, top), work / top)
    os.symlink(sys.prefix, work / ".venv")
    shiftc.export("test_package:tiny_classifier", str(work / "model.onnx"))
    shutil.copy(tiny_llama[0], work / "lm.onnx")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"], SHIFTC_QUIET="1")

    import tvm

    has_gpu = tvm.runtime.enabled("cuda") and tvm.cuda(0).exist
    ran, skipped = [], []
    for mark, lang, body in doc_blocks():
        if mark.startswith("file: "):
            path = work / mark[len("file: "):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            continue
        assert lang == "sh" or not mark, f"marked {lang} block: {mark}"
        if lang != "sh":
            continue
        if mark == "gpu" and not has_gpu:
            skipped.append(body.strip())
            continue
        if mark == "board":  # the board is qemu: every ./program runs under it
            body = re.sub(r"(?<![\w/.])\./(?=\S)", " ".join(QEMU) + " ./", body)
        else:
            assert not mark, f"unknown mark '{mark}'"
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"docs/deploy.md block failed:\n{body}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        ran.append(f"{body.splitlines()[0][:40]}… {time.perf_counter() - t0:.0f}s")
        if "classify model.so image.f32" in body:
            assert re.search(r"^\s*1\. class\s+\d+\s+logit", proc.stdout, re.M), proc.stdout
        if "./bin/app model.so" in body or "./build/app/app model.so" in body:
            assert "logits: 10 values, argmax" in proc.stdout, proc.stdout
        if "--json" in body:
            result, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
            assert result["size_bytes"]["total"] == result["size_bytes"]["model"] + result["size_bytes"]["runtime"] > 0
    assert len(ran) >= 10, ran
    assert (work / "wheels").is_dir() and len(os.listdir(work / "wheels")) == 2
    print(f"\n[deploy.md] {len(ran)} blocks run: {ran}" + (f"; needs a GPU, not run here: {skipped}" if skipped else ""))
