"""Targets: names, ISA detection, cross-ISA x86 builds, and the CUDA build step (no GPU needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import shiftc
from conftest import ort_run
from shiftc.errors import BadInputError, UsageError
from shiftc.targets import get_target, host_cpu_flags

TOL_MLP = (1e-5, 1e-5)


def test_host_target_matches_cpu_flags():
    t = get_target("host")
    flags = host_cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert t.isa == "avx512"
    elif {"avx2", "fma"} <= flags:
        assert t.isa == "avx2"
    assert t.tvm["kind"] == "llvm" and t.tvm["mcpu"]


def test_unknown_target_and_arch_are_usage_errors():
    with pytest.raises(UsageError, match="pdp11"):
        get_target("pdp11")
    with pytest.raises(UsageError, match="sm_12"):
        get_target("cuda", "sm_12")
    with pytest.raises(UsageError, match="--arch"):
        get_target("host", "sm_90")


@pytest.mark.parametrize("target", ["x86-64", "x86-64-avx2"])
def test_pinned_isa_builds_run_here(tmp_path, target):
    """Libraries for older ISA levels run on this (newer) machine and agree with ONNX Runtime."""
    flags = host_cpu_flags()
    if target == "x86-64-avx2" and not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU has no AVX2")
    onnx_path, lib = str(tmp_path / "m.onnx"), str(tmp_path / "m.so")
    shiftc.export("tests.factories:mlp", onnx_path)
    r = shiftc.compile(onnx_path, lib, target=target)
    assert r.isa == get_target(target).isa
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    got = shiftc.load(lib).run({"input": x})["output"]
    np.testing.assert_allclose(got, ort_run(onnx_path, {"input": x})["output"], rtol=TOL_MLP[0], atol=TOL_MLP[1])


def test_cuda_build_step(tmp_path):
    """--target cuda builds a library holding CUDA kernels, here without a GPU. TVM 0.27 stores
    them as CUDA C++ compiled when the library is loaded on the GPU machine."""
    onnx_path, lib = str(tmp_path / "m.onnx"), str(tmp_path / "m_cuda.so")
    shiftc.export("tests.factories:mlp", onnx_path)
    import shutil

    from conftest import require

    require(shutil.which("nvcc") is not None, "nvcc not found (CUDA toolkit): the kernels' PTX check needs it")
    r = shiftc.compile(onnx_path, lib, target="cuda", arch="sm_90")
    assert r.target == "cuda" and os.path.getsize(lib) > 0
    assert r.cuda_ptx_bytes and r.cuda_ptx_bytes > 1000, "nvcc produced no PTX for the kernels"
    data = open(lib, "rb").read()
    assert b"__global__" in data and b"blockIdx" in data, "no CUDA kernels in the library"
    import tvm

    if not (tvm.runtime.enabled("cuda") and tvm.cuda(0).exist):
        with pytest.raises(BadInputError, match="CUDA"):
            shiftc.load(lib)
    else:  # on a GPU machine: numerics against ONNX Runtime on the CPU
        x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
        got = shiftc.load(lib).run({"input": x})["output"]
        np.testing.assert_allclose(got, ort_run(onnx_path, {"input": x})["output"], rtol=1e-4, atol=1e-4)


def test_aarch64_cross_compile(tmp_path):
    """--target aarch64 cross-compiles a NEON library (ELF for AArch64) with aarch64-linux-gnu-g++."""
    import shutil

    from conftest import require

    require(shutil.which("aarch64-linux-gnu-g++") is not None, "aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
    onnx_path, lib = str(tmp_path / "m.onnx"), str(tmp_path / "m_arm.so")
    shiftc.export("tests.factories:mlp", onnx_path)
    r = shiftc.compile(onnx_path, lib, target="aarch64", cpu="cortex-a76")
    assert r.isa == "neon"
    header = open(lib, "rb").read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
