"""shiftc's C kernels as object files linked into model libraries.

A model library that contains an ``ai.shiftc`` op calls the C entry points of
csrc/kernels/bcq_lut.cc (declared in csrc/include/shiftc/bcq_lut.h) by name, and a decoder with the
in-place KV cache those of csrc/kernels/attention.cc (shiftc/attention.h). :func:`kernel_object`
compiles those sources for the target into one object — the host C++ compiler, or the target's cross
compiler — with run-time ISA dispatch inside (scalar / AVX2 / AVX-512 on x86-64), and caches the
object under ``$SHIFTC_CACHE_DIR`` (default ``~/.cache/shiftc``; shiftc/paths.py) keyed by the source text, the
compiler and the flags. The sources are found in the source tree (``csrc/``) or, in an installed
wheel, in ``shiftc/csrc/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import UnsupportedError
from ..frontend.onnx_io import atomic_output
from ..paths import cache_dir

_SOURCE = Path("kernels") / "bcq_lut.cc"
_HEADER = Path("include") / "shiftc" / "bcq_lut.h"
# every source linked into model libraries, with the header it includes
_SOURCES = ((_SOURCE, _HEADER), (Path("kernels") / "attention.cc", Path("include") / "shiftc" / "attention.h"))
# included by the sources above too: part of the cache key
_INCLUDED = (*(Path("kernels") / f"bcq_lut_{isa}.inc" for isa in ("scalar", "neon", "avx2", "avx512", "amx")),
             Path("kernels") / "attention_isa.inc", Path("include") / "shiftc" / "cpu_isa.h")
FLAGS = ["-O3", "-fPIC", "-std=c++17", "-fno-math-errno", "-ffunction-sections", "-fdata-sections", "-fvisibility=hidden"]


def csrc_dir() -> Path:
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg.parent / "csrc", pkg / "csrc"):
        if (cand / _SOURCE).is_file() and (cand / _HEADER).is_file():
            return cand
    raise UnsupportedError(f"shiftc's kernel sources ({_SOURCE}) are missing from {pkg.parent / 'csrc'} and {pkg / 'csrc'}")


def kernel_header() -> Path:
    return csrc_dir() / _HEADER


def kernel_object(cross_cc: str | None = None) -> str:
    """Path of one relocatable object holding every kernel source (bcq_lut.cc, attention.cc)
    built for the target whose C++ compiler is ``cross_cc`` (None: host)."""
    cxx = cross_cc or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None or shutil.which(cxx) is None:
        raise UnsupportedError(f"compiling shiftc's kernels needs a C++ compiler ({cross_cc or 'c++/g++'} not found)")
    root = csrc_dir()
    key = hashlib.sha256()
    for src, header in _SOURCES:
        key.update((root / src).read_bytes())
        key.update((root / header).read_bytes())
    for inc in _INCLUDED:
        key.update((root / inc).read_bytes())
    for part in (cxx.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    cache = Path(cache_dir("kernels"))
    cache.mkdir(parents=True, exist_ok=True)
    obj = cache / f"shiftc_kernels-{key.hexdigest()[:16]}.o"
    if obj.is_file():
        return str(obj)
    with atomic_output(str(obj)) as tmp:
        parts = []
        for i, (src, _) in enumerate(_SOURCES):
            part = f"{tmp}.{i}.o"
            _run([cxx, *FLAGS, "-I", str(root / "include"), "-c", str(root / src), "-o", part], root / src)
            parts.append(part)
        try:
            _run([cxx, "-r", "-nostdlib", *parts, "-o", tmp], obj)  # one object: one addon to link
        finally:
            for part in parts:
                if os.path.exists(part):
                    os.remove(part)
    return str(obj)


def _run(cmd: list[str], what) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UnsupportedError(f"compiling {what} failed ({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}")


def uses_kernels(mod) -> bool:
    """Whether the Relax IRModule has PrimFuncs that call shiftc's C kernels."""
    from tvm import tirx

    from .shiftc_ops import EXTERN_ATTR

    return any(isinstance(f, tirx.PrimFunc) and f.attrs is not None and EXTERN_ATTR in f.attrs
               for f in mod.functions.values())
