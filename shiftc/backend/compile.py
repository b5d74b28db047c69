"""Compile an ONNX model into one native model library.

The library is a single shared object produced by ``tvm.compile`` + ``export_library``. Weights are
inside it (constants of the Relax VM executable), so a board needs the .so and the TVM runtime
(libtvm_runtime + libtvm_ffi) only. Besides ``main`` (the graph; arguments are the ONNX graph
inputs in order, the result a tuple of the graph outputs in order), the library exports a function
``shiftc_metadata`` that returns a uint8 tensor holding UTF-8 JSON::

    {"format": 1, "shiftc_version": ..., "target": {...TVM target...}, "target_name": "host",
     "isa": "avx512", "task": "causal-lm", "decoder": {...}, "tokenizer": "...",
     "inputs": [{"name", "dtype", "shape"}], "outputs": [...], "source": "model.onnx",
     "pipeline": "optimized", "unscheduled_functions": 0}

``unscheduled_functions`` counts the fused TIR functions that no shiftc schedule rule claimed (they
keep TVM's serial default lowering; ``CompileResult.to_json()`` names them). The Python and C++
runtimes can validate inputs and drive KV-cache decoding without any sidecar file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx

from .. import __version__
from ..errors import BadInputError, UnsupportedError
from ..frontend import metadata as md
from ..frontend.foreign import canonical
from ..frontend.onnx_io import atomic_output, load_model
from ..progress import log, step
from ..targets import TargetSpec, get_target
from ..timing import peak_rss_bytes
from .importer import to_relax
from .kernels import kernel_object, uses_kernels
from .shiftc_ops import lowering_for
from .pipeline import relax_pipeline

METADATA_FUNC = "shiftc_metadata"
LIBRARY_FORMAT = 1


@dataclass
class CompileResult:
    path: str
    target: str
    isa: str
    size_bytes: int
    seconds: float
    metadata: dict
    cuda_ptx_bytes: int | None = None  # CUDA targets: size of the PTX nvcc produced in the build check
    # CPU targets: PrimFuncs no schedule rule matched (TVM's default, serial lowering); None: not counted
    unscheduled: list[str] | None = None

    def to_json(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("path", "target", "isa", "size_bytes")},
            "seconds": round(self.seconds, 2),
            "peak_rss_bytes": peak_rss_bytes(),
            "task": self.metadata.get("task"),
            **({"cuda_ptx_bytes": self.cuda_ptx_bytes} if self.cuda_ptx_bytes is not None else {}),
            **({"unscheduled_functions": {"count": len(self.unscheduled), "names": list(self.unscheduled)}}
               if self.unscheduled is not None else {}),
        }


def library_metadata(model: onnx.ModelProto, target: TargetSpec, source: str) -> dict:
    meta = {
        "format": LIBRARY_FORMAT,
        "shiftc_version": __version__,
        "target": target.tvm,
        "target_name": target.name,
        "isa": target.isa,
        "device": target.device_type,
        "source": os.path.basename(source),
        "source_path": os.path.abspath(source) if os.path.exists(source) else None,
    }
    meta.update(md.get_info(model))
    meta.update(md.signature(model))
    return meta


def _add_metadata_function(mod, meta: dict):
    from tvm import relax

    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    bb = relax.BlockBuilder()
    with bb.function(METADATA_FUNC, []):
        bb.emit_func_output(relax.const(blob, "uint8"))
    mod[METADATA_FUNC] = bb.get()[METADATA_FUNC].with_attr("global_symbol", METADATA_FUNC)
    return mod


def _kv_cache_graph(proto: onnx.ModelProto, spec: TargetSpec, mode: str,
                    dtype: str = "float16") -> tuple[onnx.ModelProto, dict | None]:
    """The graph to import and the library's ``kv_cache`` metadata: for a causal LM on a CPU target
    with ``mode`` "inplace", attention on in-place caches of ``dtype`` (backend/kv_cache.py); else
    as it is."""
    from . import kv_cache

    if mode not in ("inplace", "concat"):
        raise BadInputError(f"--kv-cache must be 'inplace' or 'concat', got {mode!r}")
    if dtype not in kv_cache.KV_DTYPES:
        raise BadInputError(f"--kv-dtype must be one of {sorted(kv_cache.KV_DTYPES)}, got {dtype!r}")
    info = md.get_info(proto)
    if info.get("task") != "causal-lm" or "decoder" not in info:
        return proto, None
    if mode == "concat" or spec.device_type != "cpu":
        return proto, {"mode": "concat", "reason": "asked for" if mode == "concat" else f"{spec.device_type} target"}
    graph, reason = kv_cache.rewrite(proto, int(info["decoder"]["num_layers"]), dtype)
    if graph is None:
        return proto, {"mode": "concat", "reason": reason}
    return graph, {"mode": "inplace", "dtype": dtype, "main": md.signature(graph)}


def _add_decode_function(mod):
    """``decode``: main with one sequence and one new token (batch = seq = 1), beside main. Its
    shapes are static but for the context, so a decode step runs without most of main's run-time
    shape arithmetic (make_shape, match_shape) and its fused functions are specialised to one row;
    the runtimes call it for single-token steps of batch 1."""
    from tvm import tirx

    main = mod["main"]
    shape = main.params[0].ty.shape  # input_ids [batch, seq]
    dims = [d for d in getattr(shape, "values", ()) if not isinstance(d, tirx.IntImm)]
    if not dims:  # a static graph: main is already specialised
        return mod, False
    mod["decode"] = main.bind_symbolic_vars({d: 1 for d in dims}).with_attr("global_symbol", "decode")
    return mod, True


def _build(mod, meta: dict, spec, source: str, after_schedule):
    """tvm.compile with the first pipeline that succeeds (``meta["pipeline"]`` names it).

    Some graphs (data-dependent shapes from Range/NonZero) defeat operator fusion: TVM's FuseOps can
    place a fused group that uses a symbolic extent before the match_cast defining it. The same
    pipeline without fusion (every op its own scheduled function) still compiles them, slower;
    TVM's plain default pipeline is the last resort. GPU targets take the optimized one only."""
    import tvm

    attempts = [("optimized", relax_pipeline(spec, after_schedule=after_schedule))]
    if spec.device_type == "cpu":
        attempts += [("unfused", relax_pipeline(spec, after_schedule=after_schedule, fuse=False)),
                     ("unfused-unscheduled", "default")]
    else:
        attempts = [("optimized", relax_pipeline(spec))]
    for i, (name, pipeline) in enumerate(attempts):
        meta["pipeline"] = name
        meta.pop("unscheduled_functions", None)
        try:
            return tvm.compile(_add_metadata_function(mod, meta), target=spec.tvm_target(), relax_pipeline=pipeline)
        except Exception as exc:
            if i + 1 == len(attempts):
                raise UnsupportedError(f"{source}: compilation for target '{spec.name}' failed: {_last_line(exc)}") from exc
            log(f"{name} pipeline failed ({_last_line(exc)}); retrying with the {attempts[i + 1][0]} pipeline")


def _export(ex, output: str, addons: list, spec) -> None:
    """The library written atomically (export_library picks the toolchain from the suffix, so the
    temporary name keeps .so)."""
    with atomic_output(output) as tmp:
        tmp_so = tmp + ".so"
        try:
            ex.export_library(tmp_so, addons=addons or None, **_export_options(spec))
            os.replace(tmp_so, tmp)
        finally:
            if os.path.exists(tmp_so):
                os.remove(tmp_so)


def compile_model(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike, *, target: str = "host",
                  arch: str | None = None, cpu: str | None = None, kv_cache: str = "inplace",
                  kv_dtype: str = "float16") -> CompileResult:
    """ONNX (a path or a ModelProto) -> model library at ``output`` (written atomically).

    ``kv_cache``: "inplace" (default) lowers a causal LM's attention onto caches that each step
    writes into (CPU targets; backend/kv_cache.py), "concat" keeps the graph's functional cache;
    ``kv_dtype``: the element type of in-place caches, "float16" (default) or "float32"."""
    import time

    t0 = time.perf_counter()
    spec = get_target(target, arch, cpu)
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        with step(f"loading {source}"):
            proto = load_model(source)
        proto = canonical(source, proto)
    else:
        source, proto = "<in-memory model>", model
    output = os.fspath(output)
    if not output.endswith(".so"):
        raise BadInputError(f"output '{output}': a model library must be named *.so")

    graph, kv_meta = _kv_cache_graph(proto, spec, kv_cache, kv_dtype)
    fused = convs = 0
    if spec.device_type == "cpu":  # one kernel call per group of packed matmuls on one input; convs as GEMMs
        from . import conv_gemm, fuse_matmuls

        graph, fused = fuse_matmuls.rewrite(graph)
        graph, convs = conv_gemm.rewrite(graph)
    with step("importing ONNX into Relax"), lowering_for(spec.device_type):
        mod = to_relax(graph, source)
    if kv_meta and kv_meta.get("mode") == "inplace":
        mod, has_decode = _add_decode_function(mod)
        if has_decode:
            kv_meta["decode"] = "decode"
    addons = []
    if uses_kernels(mod):
        with step("compiling shiftc's kernels"):
            addons.append(kernel_object(spec.cross_cc))
    meta = library_metadata(proto, spec, source)
    meta["kv_cache"] = kv_meta
    meta["fused_matmuls"] = fused
    meta["conv_gemm"] = convs
    unscheduled: list[str] | None = None

    def count_unscheduled(mod):
        # after the schedule rules: record what fell back to TVM's default lowering, in the
        # result and in the library's metadata (the metadata function is rebuilt with the count)
        nonlocal unscheduled
        from .schedules import unscheduled_functions

        unscheduled = unscheduled_functions(mod)
        meta["unscheduled_functions"] = len(unscheduled)
        return _add_metadata_function(mod, meta)

    with step(f"compiling for {spec.name} ({spec.description})"):
        ex = _build(mod, meta, spec, source, count_unscheduled)
    if "unscheduled_functions" not in meta:  # the pipeline that succeeded schedules nothing of its own
        unscheduled = None
    meta_ptx = _check_cuda_kernels(ex, spec) if spec.device_type == "cuda" else None
    with step(f"writing {output}"):
        _export(ex, output, addons, spec)
    result = CompileResult(output, spec.name, spec.isa, os.path.getsize(output), time.perf_counter() - t0, meta)
    result.cuda_ptx_bytes = meta_ptx
    result.unscheduled = unscheduled
    if unscheduled:
        log(f"{len(unscheduled)} function(s) no schedule rule matched (TVM's default lowering): "
            + ", ".join(unscheduled[:8]) + (" ..." if len(unscheduled) > 8 else ""))
    return result


def _cuda_sources(module) -> list[str]:
    found = []
    if getattr(module, "kind", None) == "cuda":
        found.append(module.inspect_source())
    for sub in module.imports:
        found += _cuda_sources(sub)
    return found


def _check_cuda_kernels(ex, spec: TargetSpec) -> int | None:
    """TVM 0.27 keeps CUDA kernels as CUDA C++ in the library (compiled when it is loaded). Where
    nvcc is available, compile them to PTX for the requested arch now, so that a kernel that does
    not build fails here, at compile time, not on the GPU machine. Returns the PTX size."""
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    sources = _cuda_sources(ex.mod)
    if not sources:
        raise UnsupportedError(f"target {spec.name}: the build produced no CUDA kernels")
    if nvcc is None:
        log("nvcc not found: CUDA kernels not pre-checked (they compile when the library is loaded)")
        return None
    total = 0
    with step(f"checking CUDA kernels with nvcc ({spec.tvm['arch']})"), tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(sources):
            cu, ptx = os.path.join(tmp, f"k{i}.cu"), os.path.join(tmp, f"k{i}.ptx")
            with open(cu, "w") as f:
                f.write(src)
            r = subprocess.run([nvcc, "--ptx", f"-arch={spec.tvm['arch']}", "-o", ptx, cu], capture_output=True, text=True)
            if r.returncode != 0:
                raise UnsupportedError(f"target {spec.name}: nvcc rejected the generated kernels: {r.stderr.strip()[-800:]}")
            total += os.path.getsize(ptx)
    return total


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else repr(exc)


# linker options of the library: no debug sections (the kernels' object carries some), and no
# kernel code the library does not call (the kernels' object has a section per function, hidden
# symbols); the dynamic symbols the runtime looks the functions up by stay
LINK_OPTIONS = ["-Wl,--strip-debug", "-Wl,--gc-sections"]


def _export_options(spec: TargetSpec) -> dict:
    if spec.cross_cc is None:
        return {"options": LINK_OPTIONS}
    import shutil

    from tvm.support import cc

    if shutil.which(spec.cross_cc) is None:
        raise UnsupportedError(
            f"--target {spec.name} needs the cross compiler '{spec.cross_cc}' "
            "(Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
        )
    return {"fcompile": cc.cross_compiler(spec.cross_cc, options=LINK_OPTIONS)}
