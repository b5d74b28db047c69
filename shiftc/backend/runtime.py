"""Run a model: a compiled library (TVM runtime) or an ``.onnx`` file (ONNX Runtime, the reference).

Both expose the same interface, so evaluation, benchmarks and generation treat them alike:

    m = load("model.so", threads=2)        # or load("model.onnx")
    m.run({"x": array}) -> {"y": array}    # numpy in, numpy out; inputs checked against the signature
    s = m.lm_session(batch=1)              # causal LMs: incremental decoding with a KV cache
    logits = s.step(token_ids)             # [B, S] -> [B, S, V]; the cache grows by S

Inputs are validated before a run: names, dtypes, ranks, fixed dimensions, and that every
symbolic dimension (``batch``, ``past + seq``) takes one consistent value.
"""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

from ..errors import BadInputError, RuntimeInputError, UsageError
from .compile import METADATA_FUNC


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class Model:
    """Common interface of compiled and ONNX Runtime models."""

    kind = "?"
    meta: dict
    path: str

    @property
    def task(self) -> str:
        return self.meta.get("task", "custom")

    @property
    def inputs(self) -> list[dict]:
        return self.meta["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.meta["outputs"]

    # -- plain runs -------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray] | list[np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._prepare(feeds)
        outs = self._run_raw(arrays)
        return {o["name"]: self._to_numpy(v) for o, v in zip(self.outputs, outs)}

    def _prepare(self, feeds) -> list[np.ndarray]:
        if isinstance(feeds, dict):
            unknown = sorted(set(feeds) - {i["name"] for i in self.inputs})
            if unknown:
                raise RuntimeInputError(
                    f"{self.path}: unknown input(s) {unknown}; the model takes "
                    f"{[i['name'] for i in self.inputs]}"
                )
            missing = [i["name"] for i in self.inputs if i["name"] not in feeds]
            if missing:
                raise RuntimeInputError(f"{self.path}: missing input(s) {missing}")
            arrays = [feeds[i["name"]] for i in self.inputs]
        else:
            arrays = list(feeds)
            if len(arrays) != len(self.inputs):
                raise RuntimeInputError(
                    f"{self.path}: expected {len(self.inputs)} inputs, got {len(arrays)}"
                )
        return check_inputs(self.path, self.inputs, [np.asarray(a) for a in arrays])

    def _run_raw(self, arrays: list) -> list:
        raise NotImplementedError

    def _to_numpy(self, value) -> np.ndarray:
        return np.asarray(value)

    # -- causal LM ----------------------------------------------------------------------------
    def lm_session(self, batch: int = 1) -> "LMSession":
        if self.task != "causal-lm" or "decoder" not in self.meta:
            raise UsageError(f"{self.path}: task is '{self.task}', not a causal LM with a KV cache")
        return LMSession(self, batch)

    def _empty_past(self, shape: tuple[int, ...]):
        return np.zeros(shape, np.float32)

    def _past_from_outputs(self, outs: list) -> list:
        return list(outs[1:])


class CompiledModel(Model):
    """A model library compiled by shiftc, run by the TVM runtime."""

    kind = "compiled"

    def __init__(self, path: str, threads: int | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = path
        if not os.path.isfile(path):
            raise BadInputError(f"model library '{path}' does not exist")
        set_threads(threads or default_threads())
        self.threads = threads or default_threads()
        _load_device_runtimes()
        try:
            lib = tvm.runtime.load_module(path)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[-1]
            if "cuda" in msg:
                raise BadInputError(
                    f"'{path}' is compiled for CUDA; it loads only where an NVIDIA GPU and its driver are present"
                ) from exc
            raise BadInputError(f"'{path}' is not a loadable model library: {msg}") from exc
        self.meta = _read_metadata(lib, path)
        device = self.meta.get("device", "cpu")
        if device == "cuda":
            if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
                raise BadInputError(f"'{path}' is compiled for CUDA, but no CUDA device is available here")
            self._device = tvm.cuda(0)
        else:
            self._device = tvm.cpu()
        self._vm = VirtualMachine(lib, self._device)
        self._main = self._vm["main"]
        self._tensor = tvm.runtime.tensor
        kv = self.meta.get("kv_cache") or {}
        #: the library's main takes in-place caches (backend/kv_cache.py) instead of the ONNX
        #: graph's past/present tensors; run() adapts, LMSession keeps the caches
        self.kv_inplace = kv.get("mode") == "inplace"
        #: element type of the in-place caches (libraries from before float16 caches: float32)
        self.kv_dtype = np.dtype(kv.get("dtype", "float32"))
        #: main specialised to batch 1 and one new token (backend/compile.py), for such steps
        self._decode = self._vm["decode"] if kv.get("decode") else None
        self._one_token = None  # decode_step's reused input tensors (ids, pos, a row of ones)

    def _args(self, arrays):
        return [a if not isinstance(a, np.ndarray) else self._tensor(np.ascontiguousarray(a), self._device) for a in arrays]

    def _run_raw(self, arrays):
        if self.kv_inplace:
            return self._run_onnx_signature(arrays)
        out = self._main(*self._args(arrays))
        if len(self.outputs) == 1:
            return [out]
        return [out[i] for i in range(len(self.outputs))]

    def decode_step(self, token: int, position: int, caches: list):
        """The logits [1, 1, V] of one token of one sequence at ``position`` on in-place caches,
        through the decode function (libraries that have it). Its inputs live in tensors kept
        from one call to the next (the mask a view of a row of ones): a step allocates none."""
        total = position + 1
        if self._one_token is None or self._one_token[2].shape[1] < total:
            rows = max(256, total, 2 * (self._one_token[2].shape[1] if self._one_token else 0))
            self._one_token = (self._tensor(np.zeros((1, 1), np.int64), self._device),
                               self._tensor(np.zeros((1, 1), np.int64), self._device),
                               self._tensor(np.ones((1, rows), np.int64), self._device))
        ids, pos, ones = self._one_token
        ids.copyfrom(np.array([[token]], np.int64))
        pos.copyfrom(np.array([[position]], np.int64))
        return self._decode(ids, ones._create_view((1, total)), pos, *caches)

    def run_kv(self, ids, mask, pos, caches: list) -> np.ndarray:
        """One step on in-place caches [B, KVH, max_len, D] (rows [T − S, T) are written, T =
        mask's length); returns the logits."""
        fn = self._decode if self._decode is not None and np.shape(ids) == (1, 1) else self._main
        return fn(*self._args([ids, mask, pos]), *caches)

    def cache_tensor(self, array: np.ndarray):
        return self._tensor(array, self._device)

    def _run_onnx_signature(self, arrays):
        """The ONNX graph's signature on a library with in-place caches: each past [B, KVH, P, D]
        is copied into a cache of P + S rows, which after the step holds the present (returned as
        float32, the graph's type, whatever the cache's element type)."""
        ids, mask, pos, past = arrays[0], arrays[1], arrays[2], arrays[3:]
        s = np.asarray(ids).shape[1]
        caches = []
        for p in past:
            p = p.numpy() if hasattr(p, "numpy") else np.asarray(p)
            c = np.zeros(p.shape[:2] + (p.shape[2] + s, p.shape[3]), self.kv_dtype)
            c[:, :, :p.shape[2]] = p
            caches.append(self.cache_tensor(c))
        logits = self.run_kv(ids, mask, pos, caches)
        if self.kv_dtype != np.float32:
            caches = [self.cache_tensor(c.numpy().astype(np.float32)) for c in caches]
        return [logits, *caches]

    def _to_numpy(self, value):
        return value.numpy()

    def _empty_past(self, shape):
        return self._tensor(np.zeros(shape, np.float32), self._device)


@functools.lru_cache(maxsize=None)
def _load_device_runtimes() -> None:
    """Register TVM's CUDA runtime (module loader, device API) where the wheel ships it and a
    driver is present; harmless elsewhere. Needed in runtime-only installs, where nothing else
    loads it."""
    import ctypes

    import tvm

    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(lib):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            return  # no CUDA driver on this machine
        if getattr(tvm.base, "_RUNTIME_ONLY", False):
            _register_nvcc_callback()


def _register_nvcc_callback() -> None:
    """CUDA libraries from TVM 0.27 carry CUDA C++ that the CUDA runtime compiles when the library
    is loaded, through the global function ``tvm_callback_cuda_compile``. TVM's own callback needs
    its compiler library; in a runtime-only install shiftc registers one that runs nvcc for the
    GPU present and caches the fatbin under ~/.cache/shiftc/cuda."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    import tvm
    import tvm_ffi

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "") if dev.exist else "sm_80"
    if arch == "sm_90":
        arch = "sm_90a"
    from ..paths import cache_dir

    cache = cache_dir("cuda")

    def compile_cuda(code, *_):
        key = hashlib.sha256((arch + "\0" + str(code)).encode()).hexdigest()[:32]
        path = os.path.join(cache, key + ".fatbin")
        if not os.path.exists(path):
            os.makedirs(cache, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.cu")
                with open(src, "w") as f:
                    f.write(str(code))
                out = os.path.join(tmp, "k.fatbin")
                subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", out, src], check=True,
                               capture_output=True)
                os.replace(out, path)
        with open(path, "rb") as f:
            return f.read()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def _read_metadata(lib, path: str) -> dict:
    """The JSON of the library's ``shiftc_metadata`` function (run on the CPU: it only returns a
    constant, so it works whatever device the model is for)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        vm = VirtualMachine(lib, tvm.cpu())
        blob = vm[METADATA_FUNC]().numpy().tobytes()
        return json.loads(blob.decode("utf-8"))
    except Exception as exc:
        raise BadInputError(f"'{path}' is not a shiftc model library (no {METADATA_FUNC})") from exc


class OnnxModel(Model):
    """An ``.onnx`` file run by ONNX Runtime (CPU), with the same interface."""

    kind = "onnxruntime"

    def __init__(self, path: str, threads: int | None = None, proto=None):
        import onnxruntime as ort

        from ..frontend import metadata as md
        from ..frontend.onnx_io import load_model

        self.path = path
        proto = proto if proto is not None else load_model(path)
        self.meta = {**md.get_info(proto), **md.signature(proto)}
        opts = ort.SessionOptions()
        self.threads = threads or default_threads()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BadInputError(f"ONNX Runtime cannot load '{path}': {str(exc).strip().splitlines()[0]}") from exc
        self._names = [i["name"] for i in self.inputs]
        self._out_names = [o["name"] for o in self.outputs]

    def _run_raw(self, arrays):
        return self._sess.run(self._out_names, dict(zip(self._names, arrays)))


def set_threads(n: int) -> None:
    """Size the TVM runtime's thread pool (process-wide)."""
    import tvm_ffi

    if n < 1:
        raise UsageError(f"--threads must be >= 1 (got {n})")
    tvm_ffi.get_global_func("runtime.config_threadpool")(0, int(n))


def load(path: str | os.PathLike, threads: int | None = None) -> Model:
    """Open a compiled library (``.so``) or an ONNX file (``.onnx``)."""
    path = os.fspath(path)
    if path.endswith(".onnx"):
        return OnnxModel(path, threads)
    if path.endswith(".so"):
        return CompiledModel(path, threads)
    raise UsageError(f"'{path}': expected a compiled model library (.so) or an ONNX file (.onnx)")


# -- input validation -------------------------------------------------------------------------

_SYM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _eval_dim(expr: str, env: dict[str, int]) -> int | None:
    names = _SYM.findall(expr)
    if not names or any(n not in env for n in names):
        return None
    if not re.fullmatch(r"[A-Za-z0-9_+\-* ]+", expr):
        return None
    return int(eval(expr, {"__builtins__": {}}, dict(env)))  # only names, ints and + - *


def check_inputs(path: str, spec: list[dict], arrays: list[np.ndarray]) -> list[np.ndarray]:
    env: dict[str, int] = {}
    deferred = []
    out = []
    for s, a in zip(spec, arrays):
        name, dtype, shape = s["name"], s["dtype"], s["shape"]
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise RuntimeInputError(f"{path}: input '{name}' must be {dtype}, got {a.dtype}")
        if shape is not None:
            if a.ndim != len(shape):
                raise RuntimeInputError(
                    f"{path}: input '{name}' must have rank {len(shape)} (shape {shape}), got shape {list(a.shape)}"
                )
            for axis, (want, got) in enumerate(zip(shape, a.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise RuntimeInputError(
                            f"{path}: input '{name}' dimension {axis} must be {want}, got {got} (shape {list(a.shape)})"
                        )
                elif isinstance(want, str):
                    if _SYM.fullmatch(want):
                        if env.setdefault(want, got) != got:
                            raise RuntimeInputError(
                                f"{path}: input '{name}' dimension {axis} ('{want}') is {got}, "
                                f"but another input fixed '{want}' = {env[want]}"
                            )
                    else:
                        deferred.append((name, axis, want, got))
        out.append(a)
    for name, axis, want, got in deferred:
        value = _eval_dim(want, env)
        if value is not None and value != got:
            raise RuntimeInputError(
                f"{path}: input '{name}' dimension {axis} must be {want} = {value}, got {got}"
            )
    return out


# -- incremental decoding -------------------------------------------------------------------------


class LMSession:
    """KV-cache state of one batch of sequences being decoded.

    ``step(ids)`` feeds ``S`` new tokens per sequence, returns their logits and keeps the presents
    as the next step's past. ``attention_mask``/``position_ids`` are maintained here (no padding:
    all sequences of a batch advance together).
    """

    def __init__(self, model: Model, batch: int = 1):
        self.model = model
        self.batch = batch
        d = model.meta["decoder"]
        self.num_layers, self.kv_heads, self.head_dim = d["num_layers"], d["num_kv_heads"], d["head_dim"]
        self.vocab = d["vocab_size"]
        self.eos = set(d.get("eos_token_ids", []))
        self.max_positions = d.get("max_positions")  # None: no limit recorded
        self.reset()

    def reset(self) -> None:
        shape = (self.batch, self.kv_heads, 0, self.head_dim)
        self.inplace = getattr(self.model, "kv_inplace", False)
        if self.inplace:  # the caches stay allocated: rows past `length` are never read
            self.past = getattr(self, "past", [])
        else:
            self.past = [self.model._empty_past(shape) for _ in range(2 * self.num_layers)]
        self.length = 0

    def _caches_for(self, total: int) -> list:
        """The in-place caches, grown (doubling, from 256 rows) to hold ``total`` tokens."""
        have = self.past[0].shape[2] if self.past else 0
        if total <= have:
            return self.past
        rows = max(256, have)
        while rows < total:
            rows *= 2
        shape = (self.batch, self.kv_heads, rows, self.head_dim)
        grown = []
        for old in self.past or [None] * (2 * self.num_layers):
            c = np.zeros(shape, self.model.kv_dtype)
            if old is not None and self.length:
                c[:, :, :self.length] = old.numpy()[:, :, :self.length]
            grown.append(self.model.cache_tensor(c))
        self.past = grown
        return grown

    def _forward(self, ids: np.ndarray, total: int) -> np.ndarray:
        """Logits of ``ids`` [B, S] after the session's ``length`` tokens, through main (the
        signature's mask and positions built here); the caches or presents kept."""
        b, s = ids.shape
        mask = np.ones((b, total), np.int64)
        pos = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (b, s)).copy()
        if self.length == 0:
            # the first call validates the full signature once
            check_inputs(self.model.path, self.model.inputs[:3], [ids, mask, pos])
        if self.inplace:
            return self.model._to_numpy(self.model.run_kv(ids, mask, pos, self._caches_for(total)))
        outs = self.model._run_raw([ids, mask, pos, *self.past])
        self.past = self.model._past_from_outputs(outs)
        return self.model._to_numpy(outs[0])

    def step(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, s = ids.shape
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            # compiled embedding gathers do not bounds-check: refuse before running
            raise RuntimeInputError(
                f"{self.model.path}: token ids must be in [0, {self.vocab}), got [{ids.min()}, {ids.max()}]"
            )
        if b != self.batch:
            raise RuntimeInputError(f"batch of {b} sequences given to a session of batch {self.batch}")
        total = self.length + s
        if self.max_positions and total > self.max_positions:
            raise RuntimeInputError(
                f"{self.model.path}: {total} tokens exceed the model's {self.max_positions} positions "
                "(shiftc export --max-positions)")
        if self.inplace and b == s == 1 and self.length and getattr(self.model, "_decode", None) is not None:
            # the decode loop: the decode function on input tensors kept between steps
            logits = self.model._to_numpy(self.model.decode_step(int(ids[0, 0]), self.length, self._caches_for(total)))
        else:
            logits = self._forward(ids, total)
        self.length = total
        return logits[:, -1] if last_only else logits
