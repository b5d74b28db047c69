"""The demo's rebuild rule: a library is rebuilt when missing or older than its ONNX file or than
the backend and kernel sources it was compiled with (a checkout updated since the last run)."""

from __future__ import annotations

import os

from shiftc import demo


def test_stale_when_missing_or_older_than_any_source(tmp_path):
    lib, onnx_file, src = (tmp_path / n for n in ("m.so", "m.onnx", "k.cc"))
    for i, p in enumerate((onnx_file, src)):
        p.write_text("x")
        os.utime(p, (1000 + i, 1000 + i))
    assert demo._stale(str(lib), str(onnx_file), str(src))  # missing
    lib.write_text("x")
    os.utime(lib, (1000.5, 1000.5))  # newer than the ONNX file, older than the kernel source
    assert demo._stale(str(lib), str(onnx_file), str(src))
    os.utime(lib, (2000, 2000))
    assert not demo._stale(str(lib), str(onnx_file), str(src))


def test_backend_sources_cover_the_compiler_and_the_kernels():
    names = {os.path.basename(p) for p in demo._backend_sources()}
    assert {"compile.py", "shiftc_ops.py", "kv_cache.py", "bcq_lut.cc", "attention.cc"} <= names
